import math

import pytest
import torch
import torch.nn.functional as F

from reid_ray import ReidRayError
from reid_ray.evaluation.label_free import (
    _average_precision,
    ensemble_agreement,
    feature_collapse,
    mixup_probe,
    neighbourhood_sharpness,
    sharpness_from_snd,
    silhouette,
    soft_neighborhood_density,
)


def circle(degrees):
    """Unit vectors of the plane at these angles (degrees), float64."""
    t = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([t.cos(), t.sin()], 1)


# Candidate A: two clean groups {0, 1, 2} and {3, 4, 5}; candidate B moves image 2 next to image 3.
A_DEG = [0, 10, 25, 90, 105, 115]
B_DEG = [0, 10, 85, 90, 105, 115]


def test_ensemble_agreement_hand_case():
    # Consensus S̄ = (cos Δ_A + cos Δ_B) / 2 (3 decimals), self excluded; k = 2:
    #   row 0: 1 .985, 2 .497, 3 .000, 4 -.259, 5 -.423   top-2 {1, 2}
    #   row 1: 0 .985, 2 .612, 3 .174, 4 -.087, 5 -.259   top-2 {0, 2}
    #   row 2: 0 .497, 1 .612, 3 .709, 4 .557,  5 .433    top-2 {3, 1}
    #   row 3: 0 .000, 1 .174, 2 .709, 4 .966,  5 .906    top-2 {4, 5}
    #   row 4: 0 -.259, 1 -.087, 2 .557, 3 .966, 5 .985   top-2 {5, 3}
    #   row 5: 0 -.423, 1 -.259, 2 .433, 3 .906, 4 .985   top-2 {4, 3}
    # reciprocal (j in top-2(i) and i in top-2(j)): 0: {1}, 1: {0, 2}, 2: {1} (2 -> 3 but 3 -/-> 2), 3: {4, 5},
    # 4: {3, 5}, 5: {3, 4}.
    # A ranks by angular gap: every query's pseudo-positives come first -> every AP is 1 -> 100.
    # B (angles 0, 10, 85, 90, 105, 115), ranks of the pseudo-positives:
    #   q0: 1 (gap 10) first -> AP 1;  q1: 0 (10), 2 (75) at 1, 2 -> 1;  q2: 3 (5), 4 (20), 5 (30), then 1 (75)
    #   at 4 -> 1/4;  q3: 2 (5), 4 (15), 5 (25): at 2, 3 -> (1/2 + 2/3) / 2 = 7/12;  q4: 5 (10), 3 (15) -> 1;
    #   q5: 4 (10), 3 (25) -> 1.  mAP = (4 + 1/4 + 7/12) / 6 = 29/36.
    scores = ensemble_agreement([circle(A_DEG), circle(B_DEG)], k=2)
    assert scores == pytest.approx([100.0, 100 * 29 / 36])


def test_ensemble_agreement_ties_go_by_index():
    # D puts {0, 1, 3} on (1, 0) and {2, 4, 5} on (0, 1): exact similarities 1 and 0, so many exact ties.
    # Consensus of [A, A, D] = (2 S_A + S_D) / 3, top-2: 0 {1 .990, 2 .604}, 1 {0 .990, 2 .644},
    # 2 {1 .644, 0 .604}, 3 {4 .644, 5 .604}, 4 {5 .990, 3 .644}, 5 {4 .990, 3 .604}: all reciprocal, so the
    # pseudo-positives are the groups {0, 1, 2} and {3, 4, 5}; A scores 100 (as above).
    # D's ranking, ties broken by index (lower first):
    #   q0: 1, 3 (s 1), 2, 4, 5 (s 0): positives 1, 2 at 1, 3 -> (1 + 2/3) / 2 = 5/6;  q1: 0, 3, 2, 4, 5 -> 5/6
    #   q2: 4, 5, 0, 1, 3: positives 0, 1 at 3, 4 -> (1/3 + 2/4) / 2 = 5/12
    #   q3: 0, 1, 2, 4, 5: positives 4, 5 at 4, 5 -> (1/4 + 2/5) / 2 = 13/40
    #   q4: 2, 5, 0, 1, 3: positives 5, 3 at 2, 5 -> (1/2 + 2/5) / 2 = 9/20;  q5: 2, 4, 0, 1, 3 -> 9/20
    #   mAP = (100 + 100 + 50 + 39 + 54 + 54) / 120 / 6 = 397/720 (ties the other way round would give q0 (1/2 + 2/5) / 2)
    d = torch.tensor([[1.0, 0], [1, 0], [0, 1], [1, 0], [0, 1], [0, 1]], dtype=torch.float64)
    a = circle(A_DEG)
    assert ensemble_agreement([a, a, d], k=2) == pytest.approx([100.0, 100.0, 100 * 397 / 720])


def clustered(ids=20, per=5, dim=16, noise=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(ids, dim, generator=g)
    x = centers.repeat_interleave(per, 0) + noise * torch.randn(ids * per, dim, generator=g)
    return F.normalize(x, dim=1), torch.arange(ids).repeat_interleave(per)


def test_ensemble_agreement_prefers_the_consensus_over_a_shuffled_candidate():
    f, _ = clustered()
    shuffled = f[torch.randperm(len(f), generator=torch.Generator().manual_seed(1))]
    good, same, bad = ensemble_agreement([f, f, shuffled], k=4)
    assert good == same and good > 80 and bad < 20


def reference_agreement(features, k):
    """Brute force with full N×N matrices: stable sorts (ties by index), Python sets and loops."""
    n = len(features[0])
    sbar = torch.stack([f @ f.T for f in features]).mean(0)
    sbar.fill_diagonal_(-torch.inf)
    top = [set(torch.sort(-sbar[i], stable=True).indices[:k].tolist()) for i in range(n)]
    pos = [{j for j in top[i] if i in top[j]} for i in range(n)]
    scores = []
    for f in features:
        s = f @ f.T
        aps = []
        for i in range(n):
            if not pos[i]:
                continue
            others = torch.tensor([j for j in range(n) if j != i])
            ranked = others[torch.sort(-s[i, others], stable=True).indices].tolist()
            hits = [r + 1 for r, j in enumerate(ranked) if j in pos[i]]
            aps.append(sum((h + 1) / r for h, r in enumerate(hits)) / len(hits))
        scores.append(100 * sum(aps) / len(aps))
    return scores


@pytest.mark.parametrize("block", [2, 7, 1024])
def test_ensemble_agreement_matches_brute_force(block):
    f, _ = clustered(ids=8, per=6, dim=8, noise=0.6)
    g = torch.Generator().manual_seed(3)
    noisy = F.normalize(f + 0.3 * torch.randn(f.shape, generator=g), dim=1)
    feats = [f, noisy, F.normalize(torch.randn(f.shape, generator=g), dim=1)]
    assert ensemble_agreement(feats, k=5, block=block) == pytest.approx(reference_agreement(feats, 5), abs=1e-9)
    # rows of ±1/2 in 4-D are unit and their similarities exact: ties everywhere, in the top-k and in the ranks
    signs = [(torch.randint(0, 2, (40, 4), generator=g) * 2 - 1) / 2 for _ in range(3)]
    assert ensemble_agreement(signs, k=6, block=block) == pytest.approx(reference_agreement(signs, 6), abs=1e-9)


@pytest.mark.parametrize("most", [0, 1000])
def test_average_precision_both_paths(most):
    # most=0: every row by rank._positions' histogram; most=1000: every row by the direct comparison
    g = torch.Generator().manual_seed(5)
    s = torch.randint(0, 5, (30, 40), generator=g).double() / 4  # few values: ties everywhere
    s[torch.arange(30), torch.arange(30)] = -torch.inf  # rows 0..29 are queries 0..29
    pos = torch.full((30, 6), -1)
    for i in range(30):  # 1 to 6 distinct positives among the columns 30..39, -1 padded
        m = int(torch.randint(1, 7, (), generator=g))
        pos[i, :m] = torch.randperm(10, generator=g)[:m] + 30
    expected = []
    for i in range(30):
        order = torch.sort(-s[i], stable=True).indices.tolist()[:-1]  # by index among ties; the query (-inf) last
        hits = [r + 1 for r, j in enumerate(order) if j in set(pos[i].tolist())]
        expected.append(sum((h + 1) / r for h, r in enumerate(hits)) / len(hits))
    assert _average_precision(s, pos, most=most).tolist() == pytest.approx(expected, abs=1e-12)


def test_ensemble_agreement_block_independent():
    feats = [F.normalize(torch.randn(50, 6, generator=torch.Generator().manual_seed(s)), dim=1) for s in range(3)]
    assert ensemble_agreement(feats, k=4, block=2) == pytest.approx(ensemble_agreement(feats, k=4, block=1024))


def test_ensemble_agreement_bad_input():
    with pytest.raises(ReidRayError, match="differ in shape"):
        ensemble_agreement([torch.zeros(4, 2), torch.zeros(5, 2)])
    with pytest.raises(ReidRayError, match="NaN"):
        ensemble_agreement([torch.full((4, 2), math.nan)])


def embed_flat(x):
    return F.normalize(x.flatten(1), dim=1)


def test_mixup_probe_orthogonal_images_all_hit():
    images = torch.eye(12).view(12, 1, 1, 12)  # one-hot: a probe's similarity is .7 / |m| to a, .3 / |m| to b
    assert mixup_probe(embed_flat, images, pairs=100, lam=0.7, batch=16) == 100.0


def test_mixup_probe_collapsed_model_scores_zero():
    images = torch.eye(12).view(12, 1, 1, 12)
    collapsed = lambda x: F.normalize(torch.ones(len(x), 4), dim=1)  # noqa: E731
    assert mixup_probe(collapsed, images) == 0.0  # every similarity ties: misses


def test_mixup_probe_is_seeded():
    images = torch.randn(30, 1, 1, 8, generator=torch.Generator().manual_seed(0))
    scores = [mixup_probe(embed_flat, images, pairs=64, lam=0.6, seed=s, batch=10) for s in (0, 0, 1)]
    assert scores[0] == scores[1] and 0 < scores[0] < 100
    assert scores[2] != scores[0]
    with pytest.raises(ReidRayError, match="lam"):
        mixup_probe(embed_flat, images, lam=0.5)  # no dominant image


def test_mixup_probe_takes_the_pools_features_from_its_caller():
    images = torch.randn(30, 1, 1, 8, generator=torch.Generator().manual_seed(0))
    calls = []

    def counted(x):
        calls.append(len(x))
        return embed_flat(x)

    alone = mixup_probe(counted, images, pairs=64, lam=0.6, batch=10)
    assert sum(calls) == 30 + 64  # the pool, then the probes
    calls.clear()
    given = mixup_probe(counted, images, pairs=64, lam=0.6, batch=10, pool=embed_flat(images))
    assert given == alone and sum(calls) == 64  # the probes only
    with pytest.raises(ReidRayError, match="30 images but a pool of 29"):
        mixup_probe(embed_flat, images, pool=embed_flat(images[:29]))


def test_silhouette_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    f, labels = clustered(ids=6, per=5, dim=8, noise=1.0)
    labels = labels.clone()
    labels[[0, 7, 13]] = -1  # outliers, dropped
    labels[[20]] = 99  # a singleton: s = 0
    keep = labels >= 0
    expected = metrics.silhouette_score(f[keep].numpy(), labels[keep].numpy(), metric="cosine")
    assert silhouette(f, labels) == pytest.approx(expected, abs=1e-6)
    assert silhouette(f, labels, block=3) == pytest.approx(silhouette(f, labels, block=1024), abs=1e-12)
    assert math.isnan(silhouette(f, torch.zeros(len(f), dtype=torch.int64)))  # one cluster


def test_snd_hand_case():
    # angles 0, 90, 180 at temperature 1: row 0 sees s = (0, -1), row 1 (0, 0), row 2 (0, -1)
    # H(row 1) = log 2; H(rows 0, 2) = binary entropy of p = 1 / (1 + e^-1)
    p = 1 / (1 + math.exp(-1))
    h = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    f = circle([0, 90, 180])
    assert soft_neighborhood_density(f, temperature=1.0) == pytest.approx((2 * h + math.log(2)) / 3)
    assert soft_neighborhood_density(f, temperature=1.0, block=1) == pytest.approx((2 * h + math.log(2)) / 3)


def test_snd_prefers_collapse():
    # the reason it is a diagnostic only: collapsed features get the maximum, log(N - 1)
    tight = torch.eye(10, 16).repeat_interleave(5, 0)  # 10 identities of 5 identical images
    collapsed = F.normalize(torch.ones(50, 16), dim=1)
    assert soft_neighborhood_density(collapsed) == pytest.approx(math.log(49))
    assert soft_neighborhood_density(tight) == pytest.approx(math.log(4), abs=1e-6)
    f, _ = clustered()
    # float32 products differ in the last bit with the block's shape, and 1 / temperature multiplies that by 20
    assert soft_neighborhood_density(f, block=3) == pytest.approx(soft_neighborhood_density(f), rel=1e-6)


def test_neighbourhood_sharpness_reads_snd_the_other_way_round():
    # a, a, b with a ⊥ b at temperature 0.05: rows 0 and 1 see s = (1, 0), so p = (1, e^-20)/(1 + e^-20) and an
    # entropy of ~4e-8; row 2 sees (0, 0): log 2. SND = (log 2 + ~1e-7) / 3, sharpness = 100 (1 - SND / log 2)
    f = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    p = math.exp(-20) / (1 + math.exp(-20))
    h = -((1 - p) * math.log(1 - p) + p * math.log(p))
    assert neighbourhood_sharpness(f) == pytest.approx(100 * (1 - (2 * h + math.log(2)) / 3 / math.log(2)))
    assert neighbourhood_sharpness(f) == pytest.approx(200 / 3, abs=1e-5)
    # collapsed features, SND's maximum: 0; ten tight identities of 5 images: 100 (1 - log 4 / log 49)
    assert neighbourhood_sharpness(F.normalize(torch.ones(50, 16), dim=1)) == pytest.approx(0.0, abs=1e-9)
    tight = torch.eye(10, 16).repeat_interleave(5, 0)
    assert neighbourhood_sharpness(tight) == pytest.approx(100 * (1 - math.log(4) / math.log(49)), abs=1e-4)
    assert neighbourhood_sharpness(tight, block=7) == pytest.approx(neighbourhood_sharpness(tight), rel=1e-6)
    # from an SND already computed (the selection bench's older records): the same formula
    assert sharpness_from_snd(math.log(4), 50) == pytest.approx(neighbourhood_sharpness(tight), abs=1e-4)
    with pytest.raises(ReidRayError, match="N >= 3"):
        neighbourhood_sharpness(tight[:2])


def test_feature_collapse():
    same = F.normalize(torch.ones(20, 8), dim=1)
    res = feature_collapse(same)
    assert res["mean_cosine"] == pytest.approx(1.0) and res["effective_rank"] == pytest.approx(1.0)
    res = feature_collapse(torch.eye(8), block=3)
    assert res["mean_cosine"] == pytest.approx(0.0, abs=1e-12) and res["effective_rank"] == pytest.approx(8.0)
    # each of 8 orthonormal rows twice: Σf = 2·1, mean_cosine = (32 - 16) / (16 · 15); still rank 8
    res = feature_collapse(torch.eye(8).repeat(2, 1))
    assert res["mean_cosine"] == pytest.approx(16 / 240) and res["effective_rank"] == pytest.approx(8.0)
    f, _ = clustered()
    assert feature_collapse(f, block=7) == pytest.approx(feature_collapse(f))
