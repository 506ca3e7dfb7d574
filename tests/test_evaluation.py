import numpy as np
import pytest
import torch

from reid_ray import ReidRayError
from reid_ray.evaluation import evaluate_rank, pairwise_distance
from reid_ray.evaluation.reference import reference_evaluate_rank


def ev(d, qp, gp, qc, gc, **kw):
    return evaluate_rank(np.array(d, dtype=np.float32), np.array(qp), np.array(gp), np.array(qc), np.array(gc), **kw)


def test_hand_computed_case_removes_same_pid_same_camera():
    # kept ranking: g1 (pid 2), g2 (pid 1, hit), g3 (pid 3); g0 and g4 share pid AND camera: removed
    cmc, ap = ev([[0.1, 0.2, 0.3, 0.4, 0.5]], [1], [1, 2, 1, 3, 1], [0], [0, 1, 1, 1, 0], max_rank=3)
    assert cmc.tolist() == [0.0, 1.0, 1.0]
    assert ap == pytest.approx(0.5)


def test_two_hits_average_precision():
    # ranking: hit, miss, hit -> AP = (1/1 + 2/3) / 2
    cmc, ap = ev([[0.1, 0.2, 0.3]], [1], [1, 2, 1], [0], [1, 1, 2], max_rank=3)
    assert cmc.tolist() == [1.0, 1.0, 1.0]
    assert ap == pytest.approx((1 + 2 / 3) / 2)


def test_ties_are_broken_by_gallery_order():
    cmc, ap = ev([[0.5, 0.5, 0.5]], [1], [2, 1, 3], [0], [1, 1, 1], max_rank=3)
    assert cmc.tolist() == [0.0, 1.0, 1.0] and ap == pytest.approx(0.5)
    cmc, ap = ev([[0.5, 0.5, 0.5]], [1], [1, 2, 1], [0], [1, 1, 1], max_rank=3)
    assert ap == pytest.approx((1 + 2 / 3) / 2)


def test_query_without_match_is_skipped():
    cmc, ap = ev([[0.1, 0.2], [0.1, 0.2]], [1, 7], [2, 1], [0, 0], [1, 1], max_rank=2)
    assert cmc.tolist() == [0.0, 1.0] and ap == pytest.approx(0.5)


def test_distractors_pid0_count_as_misses():
    cmc, ap = ev([[0.1, 0.2]], [1], [0, 1], [0], [1, 2], max_rank=2)
    assert cmc.tolist() == [0.0, 1.0] and ap == pytest.approx(0.5)


def test_no_valid_query_is_a_clear_error():
    with pytest.raises(ReidRayError, match="no query has a match"):
        ev([[0.1]], [1], [2], [0], [1])


def test_nan_is_a_clear_error():
    with pytest.raises(ReidRayError, match="NaN"):
        ev([[np.nan, 0.1]], [1], [1, 2], [0], [1, 1])


@pytest.mark.parametrize("seed", range(6))
def test_matches_the_per_query_reference(seed):
    rng = np.random.default_rng(seed)
    q, g = int(rng.integers(5, 80)), int(rng.integers(20, 400))
    qp, gp = rng.integers(0, 20, q), rng.integers(0, 20, g)
    qc, gc = rng.integers(0, 4, q), rng.integers(0, 4, g)
    d = rng.random((q, g)).astype(np.float32)
    if seed % 2:
        d = np.round(d * 4) / 4  # many ties
    ref_cmc, ref_ap = reference_evaluate_rank(d, qp, gp, qc, gc, max_rank=10)
    cmc, ap = evaluate_rank(d, qp, gp, qc, gc, max_rank=10, chunk_size=13)
    np.testing.assert_allclose(cmc, ref_cmc, atol=1e-6)
    assert ap == pytest.approx(ref_ap, abs=1e-9)
    cmc_t, ap_t = evaluate_rank(torch.from_numpy(d), torch.from_numpy(qp), gp, qc, torch.from_numpy(gc), max_rank=10)
    np.testing.assert_allclose(cmc_t, cmc)
    assert ap_t == pytest.approx(ap, abs=1e-12)



@pytest.mark.parametrize(("cells", "max_shared"), [(1, 1.0), (3, 1.0), (1024, 1.0), (1024, 1 / 16), (1024, 0.0)])
@pytest.mark.parametrize("seed", range(4))
def test_cell_counting_is_exact_on_ties_infinities_and_flat_rows(monkeypatch, cells, max_shared, seed):
    """The histogram of cells decides every entry outside its matches' cells; these inputs put many
    entries inside them (ties, few distinct values, +-inf, constant rows, 1 or 3 cells) and must
    still give the stable-sort reference's numbers, on the cell path (max_shared 1), the binary
    search every row falls back to (max_shared 0) and a mix of the two."""
    from functools import partial

    from reid_ray.evaluation import rank

    monkeypatch.setattr(rank, "_positions", partial(rank._positions, cells=cells, max_shared=max_shared))
    rng = np.random.default_rng(100 + seed)
    q, g = int(rng.integers(10, 60)), int(rng.integers(50, 300))
    qp, gp = rng.integers(0, 8, q), rng.integers(0, 8, g)
    qc, gc = rng.integers(0, 3, q), rng.integers(0, 3, g)
    d = rng.choice(np.array([0.0, 0.25, 0.5, 1.0, 1e30, -2.0], dtype=np.float32), size=(q, g))
    d[rng.random((q, g)) < 0.05] = np.inf
    d[rng.random((q, g)) < 0.03] = -np.inf
    d[0] = 0.5  # a constant row: no range at all
    d[1, :] = rng.random(g).astype(np.float32)  # an ordinary row beside them
    if seed % 2:
        d = d.astype(np.float64)
    ref_cmc, ref_ap = reference_evaluate_rank(d, qp, gp, qc, gc, max_rank=10)
    cmc, ap = evaluate_rank(d, qp, gp, qc, gc, max_rank=10, chunk_size=7)
    np.testing.assert_allclose(cmc, ref_cmc, atol=1e-6)
    assert ap == pytest.approx(ref_ap, abs=1e-9)


def test_every_tensor_is_made_on_the_distance_matrix_device():
    """The GPU path, checked on a CPU: under a default device of `meta`, any tensor created without the
    distance matrix's device would be a meta tensor meeting CPU ones, and fail (Market's protocol)."""
    rng = np.random.default_rng(11)
    qp, gp, qc, gc = rng.integers(0, 15, 30), rng.integers(0, 15, 200), rng.integers(0, 4, 30), rng.integers(0, 4, 200)
    d = rng.random((30, 200)).astype(np.float32)
    cmc, ap = evaluate_rank(d, qp, gp, qc, gc, max_rank=10, chunk_size=7)
    with torch.device("meta"):
        cmc_t, ap_t = evaluate_rank(torch.from_numpy(d), qp, gp, qc, gc, max_rank=10, chunk_size=7)
    np.testing.assert_allclose(cmc_t, cmc)
    assert ap_t == pytest.approx(ap, abs=1e-12)

def test_cuhk03_single_shot_equals_market_when_one_image_per_identity():
    rng = np.random.default_rng(0)
    gp = np.arange(30)  # one gallery image per identity: sampling changes nothing
    qp = rng.integers(0, 30, 12)
    d = rng.random((12, 30)).astype(np.float32)
    qc, gc = np.zeros(12, int), np.ones(30, int)
    cmc, ap = evaluate_rank(d, qp, gp, qc, gc, max_rank=10)
    cmc3, ap3 = evaluate_rank(d, qp, gp, qc, gc, max_rank=10, use_metric_cuhk03=True)
    np.testing.assert_allclose(cmc3, cmc, atol=1e-6)
    assert ap3 == pytest.approx(ap)


def test_cuhk03_single_shot_is_at_least_market_cmc():
    # fewer distractor images per identity can only move the first hit up
    rng = np.random.default_rng(1)
    qp, gp = rng.integers(0, 10, 20), rng.integers(0, 10, 100)
    qc, gc = rng.integers(0, 2, 20), rng.integers(0, 2, 100)
    d = rng.random((20, 100)).astype(np.float32)
    cmc, _ = evaluate_rank(d, qp, gp, qc, gc, max_rank=10)
    cmc3, _ = evaluate_rank(d, qp, gp, qc, gc, max_rank=10, use_metric_cuhk03=True)
    assert (cmc3 >= cmc - 1e-6).all()


def test_pairwise_distance_is_squared_euclidean():
    x, y = torch.tensor([[0.0, 0.0], [1.0, 1.0]]), torch.tensor([[3.0, 4.0]])
    assert pairwise_distance(x, y).flatten().tolist() == pytest.approx([25.0, 13.0])


def test_one_pass_feeds_several_models_as_separate_passes_would():
    from reid_ray.evaluation import extract_features

    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4), torch.nn.BatchNorm1d(4)) for _ in range(2)]
    nets[1].train()
    batches = [{"img": torch.randn(5, 3, 2, 2), "pid": torch.arange(5), "camid": torch.zeros(5, dtype=torch.long)}
               for _ in range(3)]
    decoded = []

    class Loader:  # counts the passes over the data
        def __iter__(self):
            decoded.append(1)
            return iter(batches)

    both = extract_features(nets, Loader(), flip=True)
    assert len(decoded) == 1 and nets[1].training and nets[0].training  # modes restored (a new Module trains)
    for net, (f, pid, _cam) in zip(nets, both):
        alone, pid1, _ = extract_features(net, Loader(), flip=True)
        assert torch.equal(f, alone) and torch.equal(pid, pid1) and f.shape == (15, 4)
        # ordinary tensors (not inference tensors): a memory can be updated in place, a loss can use them
        assert not f.is_inference()
        f.mul_(0.5)
        (torch.nn.Parameter(torch.ones(4)) * f).sum().backward()
