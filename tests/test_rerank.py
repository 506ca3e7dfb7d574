import numpy as np
import pytest

from reid_ray import ReidRayError
from reid_ray.evaluation import re_ranking
from reid_ray.evaluation.reference import reference_re_ranking


def blocks(feats, q):
    d = ((feats[:, None] - feats[None]) ** 2).sum(-1)
    return d[:q, q:], d[:q, :q], d[q:, q:]


@pytest.mark.parametrize("q,g,k1,k2,lam", [(8, 40, 20, 6, 0.3), (25, 90, 10, 3, 0.5), (12, 60, 6, 1, 0.0)])
def test_matches_reference_formulation(q, g, k1, k2, lam):
    rng = np.random.default_rng(q)
    f = rng.normal(size=(q + g, 16)).astype(np.float32)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    qg, qq, gg = blocks(f, q)
    ref = reference_re_ranking(qg, qq, gg, k1, k2, lam)
    out = re_ranking(qg, qq, gg, k1, k2, lam)
    assert out.shape == (q, g) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-5)
    # chunking is an implementation detail: it must not change a number
    np.testing.assert_allclose(re_ranking(qg, qq, gg, k1, k2, lam, chunk_size=7, pairs_per_chunk=50), out, atol=1e-6)


def test_matches_reference_with_exact_ties():
    rng = np.random.default_rng(5)
    f = rng.integers(0, 3, size=(70, 4)).astype(np.float32)  # many identical distances
    qg, qq, gg = blocks(f, 15)
    np.testing.assert_allclose(re_ranking(qg, qq, gg), reference_re_ranking(qg, qq, gg), atol=1e-5)


def test_rejects_bad_shapes_and_k():
    z = np.zeros((3, 5), np.float32)
    with pytest.raises(ReidRayError, match="shapes"):
        re_ranking(z, np.zeros((3, 3)), np.zeros((4, 4)))
    with pytest.raises(ReidRayError, match="k1"):
        re_ranking(z, np.zeros((3, 3)), np.zeros((5, 5)), k1=20)


def test_rows_read_the_references_original_dist_bit_for_bit():
    """`_Rows.block` (tiled transposes), `_Rows.at` (single entries, read from the inputs) and
    `_Rows.query_gallery` give the reference's row-normalised squared distances exactly, on inputs that are
    not symmetric (so a row of D and a column of D differ)."""
    import torch

    from reid_ray.evaluation.rerank import _columns_as_rows, _Rows

    rng = np.random.default_rng(3)
    q, g = 5, 11
    qg, qq, gg = (rng.random(s).astype(np.float32) for s in ((q, g), (q, q), (g, g)))
    d = np.block([[qq, qg], [qg.T, gg]]) ** 2
    original = (d / d.max(0)).T  # the reference's original_dist
    m = torch.from_numpy(gg)
    assert torch.equal(_columns_as_rows(m, slice(2, 9), rows=3), m[:, 2:9].T)
    rows = _Rows(qg, qq, gg)
    blocks_ = torch.cat([rows.block(lo, min(lo + 4, q + g)) for lo in range(0, q + g, 4)])
    assert torch.equal(blocks_, torch.from_numpy(original.astype(np.float32)))
    i, j = torch.meshgrid(torch.arange(q + g), torch.arange(q + g), indexing="ij")
    assert torch.equal(rows.at(i.flatten(), j.flatten()).view(q + g, q + g), blocks_)
    assert torch.equal(rows.query_gallery(1, 4), blocks_[1:4, q:])


def test_every_tensor_is_made_on_the_inputs_device():
    """The GPU path, checked on a CPU: under a default device of `meta`, any tensor created without the inputs'
    device would be a meta tensor meeting CPU ones, and fail; the numbers must be the NumPy path's."""
    import torch

    rng = np.random.default_rng(3)
    f = rng.normal(size=(60, 16)).astype(np.float32)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    qg, qq, gg = blocks(f, 12)
    expected = re_ranking(qg, qq, gg, k1=10, k2=3, chunk_size=16, pairs_per_chunk=200)
    with torch.device("meta"):
        out = re_ranking(torch.from_numpy(qg), torch.from_numpy(qq), torch.from_numpy(gg), k1=10, k2=3,
                         chunk_size=16, pairs_per_chunk=200)
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    # an explicit device moves NumPy inputs there
    np.testing.assert_allclose(re_ranking(qg, qq, gg, k1=10, k2=3, device="cpu"), expected, atol=1e-6)


def test_torchs_sparse_invariant_warning_is_not_shown(monkeypatch):
    """torch 2.11 on CUDA (the H200's run of bench/gpu.py) warns at the first sparse tensor built while invariant
    checks are not enabled globally, even with check_invariants=False. Re-ranking and the Jaccard DBSCAN must not
    show it: here the constructor is made to warn as that build does, and every warning is an error."""
    import warnings

    import torch

    from reid_ray.clustering.dbscan import jaccard_distance

    real = torch.sparse_coo_tensor

    def warning_constructor(*args, **kwargs):
        warnings.warn("Sparse invariant checks are implicitly disabled. Memory errors (e.g. SEGFAULT) will occur",
                      UserWarning, stacklevel=2)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "sparse_coo_tensor", warning_constructor)
    rng = np.random.default_rng(4)
    f = rng.normal(size=(50, 8)).astype(np.float32)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    qg, qq, gg = blocks(f, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = re_ranking(qg, qq, gg, k1=8, k2=3)
        jac = jaccard_distance(f, k1=8, k2=3)
    np.testing.assert_allclose(out, reference_re_ranking(qg, qq, gg, 8, 3, 0.3), atol=1e-5)
    assert jac.shape == (50, 50)
    # the constructor did warn: without the filter, the same call raises
    with warnings.catch_warnings(), pytest.raises(UserWarning, match="implicitly disabled"):
        warnings.simplefilter("error")
        torch.sparse_coo_tensor(torch.zeros(2, 1, dtype=torch.long), torch.ones(1), (2, 2))
