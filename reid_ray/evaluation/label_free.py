"""Label-free scores for choosing UDA re-ID models without target labels.

    >>> maps = ensemble_agreement([f1, f2, f3], k=20)   # one mAP-like score (%) per candidate
    >>> acc = mixup_probe(embed, target_images)          # % of mixed probes retrieving their dominant image

Selection scores: `ensemble_agreement` (EnsV adapted to retrieval), `mixup_probe` (MixVal adapted to
retrieval) and `neighbourhood_sharpness` (SND read the other way round, as re-ID embeddings need). Diagnostics,
to log and never to select with: `silhouette`, `soft_neighborhood_density` (in its published direction),
`feature_collapse`.

Features are float (N, D) rows, L2-normalised, so that cosine similarity is a dot product; CPU or GPU
tensors, computed where they are. Everything runs over blocks of `block` rows: memory is O(block·N), never
an N×N matrix (N is ~13,000 at Market-1501's size).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from reid_ray import ReidRayError
from reid_ray.evaluation.rank import _packed, _positions


def _blocks(n: int, block: int):
    """(lo, hi) row ranges of at most `block` rows covering range(n)."""
    if block < 1:
        raise ReidRayError(f"label_free: block must be >= 1, got {block}")
    return ((lo, min(lo + block, n)) for lo in range(0, n, block))


def _check(features: torch.Tensor, name: str) -> torch.Tensor:
    """`features` as a float (N, D) tensor; a clear error for another shape or a non-finite value."""
    if features.dim() != 2 or not features.is_floating_point():
        raise ReidRayError(f"{name}: features must be a float (N, D) tensor, got {tuple(features.shape)} "
                           f"{features.dtype}")
    if not torch.isfinite(features).all():
        raise ReidRayError(f"{name}: features contain NaN or inf")
    return features.detach()


def _top_k(sim: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) column indices of each row's k largest entries; ties at the k-th value go to the lower index."""
    vals, idx = sim.topk(min(k + 1, sim.shape[1]), dim=1)
    kth = vals[:, k - 1:k]
    if vals.shape[1] == k or not (vals[:, k:] == kth).any():  # no tie straddles the cut: topk's set is the set
        return idx[:, :k]
    above = sim > kth
    at = sim == kth
    take = above | (at & (torch.cumsum(at, 1) <= k - above.sum(1, keepdim=True)))
    return take.nonzero()[:, 1].view(len(sim), k)


def _average_precision(s: torch.Tensor, pos: torch.Tensor, most: int | None = None) -> torch.Tensor:
    """AP (B,) float64 of each row of similarities s (B, N) for its positives pos (B, P), -1 padded, ≥ 1 a row.

    Entry j is ranked before positive p when s_j > s_p, or s_j = s_p and j < p (a query's own entry must be
    -inf). Only the entries at or above a row's lowest positive can be ranked before one: one pass finds them,
    and each is compared with the row's P positives ((M, P) at once). A row with more than N / P of them (a
    poor candidate) costs less by `rank._positions`' histogram of the whole row, and goes there (`most`: that
    bound, for the tests).
    """
    b, n = s.shape
    present = pos >= 0
    idx = pos.clamp(min=0)
    thr = s.gather(1, idx)
    lowest = torch.where(present, thr, torch.inf).amin(1, keepdim=True)
    rows, cols = (s >= lowest).nonzero(as_tuple=True)
    heavy = torch.bincount(rows, minlength=b) > (max(1, n // pos.shape[1]) if most is None else most)
    light = ~heavy[rows]
    rows, cols = rows[light], cols[light]
    v, t = s[rows, cols][:, None], thr[rows]
    before = torch.zeros(b, pos.shape[1], dtype=torch.int32, device=s.device).index_add_(0, rows, (v > t).to(torch.int32))
    m, c = (v == t).nonzero(as_tuple=True)  # ties, few: each positive with itself, and exact equals
    first = cols[m] < idx[rows[m], c]
    before.index_put_((rows[m[first]], c[first]), torch.ones_like(c[first], dtype=torch.int32), accumulate=True)
    position = torch.where(present, before.double() + 1, torch.inf).sort(1).values  # each row's positives in rank order
    if heavy.any():
        h = heavy.nonzero()[:, 0]
        ranked = _positions(-s[h], pos[h], torch.full_like(h[:, None], -1))[0]  # rank order, 0 where padded
        position[h] = torch.where(ranked > 0, ranked, torch.inf)
    hit_no = torch.arange(1, pos.shape[1] + 1, dtype=torch.float64, device=s.device)
    return torch.where(torch.isfinite(position), hit_no / position, 0.0).sum(1) / present.sum(1)


def ensemble_agreement(features: list[torch.Tensor], k: int = 20, block: int = 1024) -> list[float]:
    """Each candidate's retrieval mAP (%, 0-100) against pseudo-positives agreed on by all candidates.

    EnsV (Hu, Luo, Liang and Foo, "Towards Reliable Model Selection for Unsupervised Domain Adaptation: An
    Empirical Study and A Certified Baseline", NeurIPS 2024 Datasets and Benchmarks track: a simple ensemble of
    the candidate models as a role model), adapted from classification to retrieval.
    features: the T candidates' (N, D) features of the same N target images, in the same order.

    Consensus S̄ = (1/T) Σ_t F_t F_tᵀ, one row block at a time (its top-k lists are those of Σ_t F_t F_tᵀ:
    no division). The pseudo-positives of image i are its k-reciprocal neighbours under S̄: j ≠ i with j in
    top-k(i) and i in top-k(j) (self excluded from the lists; ties at the k-th place go to the lower index).
    Candidate t's score is mAP over the queries i with ≥ 1 pseudo-positive, gallery = the other N - 1 images:
    AP_i = (1/|P_i|) Σ_{p∈P_i} #{q ∈ P_i: r_q ≤ r_p} / r_p, with r_p = 1 + #{j ≠ i: s_ij > s_ip or
    (s_ij = s_ip and j < p)} under s = F_t F_tᵀ (ties broken by index, as `evaluate_rank` breaks them by
    gallery order). The ranks compare each (B, N) block of s with its (B, P) positives' similarities, no sort
    of the rows (`_average_precision`). Raises if no image has a pseudo-positive.
    """
    feats = [_check(f, "ensemble_agreement") for f in features]
    if not feats:
        raise ReidRayError("ensemble_agreement: no candidates")
    n = len(feats[0])
    if any(f.shape != feats[0].shape or f.device != feats[0].device for f in feats):
        raise ReidRayError("ensemble_agreement: candidates' features differ in shape or device: "
                           + ", ".join(f"{tuple(f.shape)} on {f.device}" for f in feats))
    if n < 2 or k < 1:
        raise ReidRayError(f"ensemble_agreement: needs N >= 2 images and k >= 1, got N={n}, k={k}")
    k = min(k, n - 1)
    dev = feats[0].device
    # top-k lists of every row of the consensus, self excluded: (N, k)
    nbr = torch.empty(n, k, dtype=torch.int64, device=dev)
    for lo, hi in _blocks(n, block):
        rows = torch.arange(lo, hi, device=dev)
        s = feats[0][lo:hi] @ feats[0].T
        for f in feats[1:]:
            s.addmm_(f[lo:hi], f.T)
        s[rows - lo, rows] = -torch.inf
        nbr[lo:hi] = _top_k(s, k)
    # reciprocity: j = nbr[i, c] is kept when i is in nbr[j]; -1 elsewhere
    pos = torch.empty_like(nbr)
    for lo, hi in _blocks(n, block):
        rows = torch.arange(lo, hi, device=dev)
        mutual = (nbr[nbr[lo:hi]] == rows[:, None, None]).any(2)
        pos[lo:hi] = torch.where(mutual, nbr[lo:hi], -1)
    queries = ((pos >= 0).any(1)).nonzero()[:, 0]
    if not len(queries):
        raise ReidRayError(f"ensemble_agreement: no image has a {k}-reciprocal neighbour under the consensus")
    scores = []
    for f in feats:
        ap_sum = torch.zeros((), dtype=torch.float64, device=dev)
        for lo, hi in _blocks(len(queries), block):
            q = queries[lo:hi]
            s = (f[q] @ f.T).scatter_(1, q[:, None], -torch.inf)  # the query itself is not in its gallery
            ap_sum += _average_precision(s, _packed(pos[q])).sum()
        scores.append(100 * float(ap_sum) / len(queries))
    return scores


def mixup_probe(embed: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, *, pairs: int = 256,
                lam: float = 0.7, seed: int = 0, batch: int = 128, pool: torch.Tensor | None = None) -> float:
    """% (0-100) of mixed probes whose top-1 retrieval among the N target images is their dominant image.

    MixVal (Hu et al., "Mixed Samples as Probes for Unsupervised Model Selection in Domain Adaptation",
    NeurIPS 2023), adapted to retrieval and to the target set alone.
    embed: maps a float image batch (B, C, H, W) to L2-normalised (B, D) features; it is called as given
    (put a model in eval mode first), under `torch.inference_mode`, `batch` images at a time.
    images: the N ≥ 2 target images, already through the test transform.

    `pairs` pairs (a, b), a ≠ b, are drawn with replacement from a generator seeded by `seed` (the same seed,
    the same pairs); probe m = lam·x_a + (1 - lam)·x_b. A probe is a hit when a's similarity to f(m) is
    strictly above every other pool image's: ties count as misses, so a collapsed model (all similarities
    equal) scores 0, and a nearly collapsed one about 100/N.
    pool: `embed(images)` where the caller has it already (N, D): the images are then not embedded again.
    """
    n = len(images)
    if n < 2 or pairs < 1 or not 0.5 < lam < 1:
        raise ReidRayError(f"mixup_probe: needs N >= 2 images, pairs >= 1 and 0.5 < lam < 1 (a dominates), got N={n}, "
                           f"pairs={pairs}, lam={lam}")
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(n, (pairs,), generator=gen)
    b = torch.randint(n - 1, (pairs,), generator=gen)
    b += b >= a  # uniform over the other N - 1 images
    hits = 0
    with torch.inference_mode():
        if pool is None:
            pool = torch.cat([embed(images[lo:hi]).float() for lo, hi in _blocks(n, batch)])
        elif pool.shape[0] != n:
            raise ReidRayError(f"mixup_probe: {n} images but a pool of {pool.shape[0]} features")
        pool = pool.float()
        for lo, hi in _blocks(pairs, batch):
            ia, ib = a[lo:hi].to(images.device), b[lo:hi].to(images.device)
            probe = embed(lam * images[ia] + (1 - lam) * images[ib]).float()
            s = probe @ pool.T
            ia = ia.to(s.device)
            own = s.gather(1, ia[:, None])[:, 0]
            s.scatter_(1, ia[:, None], -torch.inf)
            hits += int((own > s.amax(1)).sum())
    return 100 * hits / pairs


def silhouette(features: torch.Tensor, labels: torch.Tensor, block: int = 1024) -> float:
    """Mean silhouette coefficient under the cosine distance 1 - s (a diagnostic: never select with it).

    Rousseeuw, "Silhouettes: a graphical aid to the interpretation and validation of cluster analysis",
    J. Comput. Appl. Math., 1987. Images with a negative label (DBSCAN's -1 outliers) are left out first.
    For image i of cluster A: a_i = mean distance to the other members of A, b_i = min over clusters C ≠ A
    of the mean distance to C's members, s_i = (b_i - a_i) / max(a_i, b_i); s_i = 0 in a singleton cluster
    (as sklearn.metrics.silhouette_score). The per-cluster distance sums come from the cluster sums of the
    unit rows, Σ_{j∈C} (1 - f_i·f_j) = |C| - f_i·Σ_{j∈C} f_j, a (B, D) × (D, #clusters) product per row
    block in float64 (i's own term, 1 - f_i·f_i, is taken out of its cluster's sum).
    NaN when fewer than 2 clusters remain, or as many clusters as images (sklearn raises there).
    """
    feats = _check(features, "silhouette")
    labels = torch.as_tensor(labels, device=feats.device)
    if labels.shape != (len(feats),):
        raise ReidRayError(f"silhouette: {len(feats)} features but labels of shape {tuple(labels.shape)}")
    keep = labels >= 0
    feats = feats[keep].double()
    _, lab = torch.unique(labels[keep], return_inverse=True)
    n = len(feats)
    num = int(lab.max()) + 1 if n else 0
    if not 2 <= num <= n - 1:
        return math.nan
    size = torch.bincount(lab, minlength=num).double()
    sums = torch.zeros(num, feats.shape[1], dtype=torch.float64, device=feats.device).index_add_(0, lab, feats)
    total = torch.zeros((), dtype=torch.float64, device=feats.device)
    for lo, hi in _blocks(n, block):
        f, own = feats[lo:hi], lab[lo:hi, None]
        dist_sum = size[None, :] - f @ sums.T  # (B, #clusters)
        intra = (dist_sum.gather(1, own)[:, 0] - (1 - (f * f).sum(1))) / (size[own[:, 0]] - 1).clamp(min=1)
        inter = (dist_sum / size[None, :]).scatter_(1, own, torch.inf).amin(1)
        s = (inter - intra) / torch.maximum(intra, inter)
        total += torch.where((size[own[:, 0]] > 1) & torch.isfinite(s), s, 0.0).sum()
    return float(total) / n


def soft_neighborhood_density(features: torch.Tensor, temperature: float = 0.05, block: int = 1024) -> float:
    """Soft Neighborhood Density: mean entropy of each image's softmax over its similarities to the others.

    SND (Saito et al., "Tune it the Right Way: Unsupervised Validation of Domain Adaptation via Soft
    Neighborhood Density", ICCV 2021): H_i = -Σ_{j≠i} p_ij log p_ij, p_ij = softmax_{j≠i}(s_ij / temperature);
    SND = (1/N) Σ_i H_i (in nats; at most log(N - 1)). The paper applies it to classifier outputs and prefers
    the higher value.

    A diagnostic only, never a selection score: on re-ID embeddings it ranks collapsed features above tight
    identities (all similarities equal give the maximum, log(N - 1)). A synthetic check of 150 identities
    gave SND 2.94 for tight clusters and 8.01 for collapsed features (20 images each: about log 19 and
    log 2999).
    """
    feats = _check(features, "soft_neighborhood_density")
    n = len(feats)
    if n < 2:
        raise ReidRayError(f"soft_neighborhood_density: needs N >= 2 images, got {n}")
    total = torch.zeros((), dtype=torch.float64, device=feats.device)
    for lo, hi in _blocks(n, block):
        rows = torch.arange(lo, hi, device=feats.device)
        z = (feats[lo:hi] @ feats.T).double() / temperature
        z[rows - lo, rows] = -torch.inf
        logp = torch.log_softmax(z, 1)
        # -Σ p log p over j ≠ i: the diagonal's p is 0 (its log p, -inf, is replaced so as not to make 0·inf)
        total -= (logp.exp() * logp.nan_to_num(neginf=0.0)).sum()
    return float(total) / n


def neighbourhood_sharpness(features: torch.Tensor, temperature: float = 0.05, block: int = 1024,
                            snd: float | None = None) -> float:
    """How peaked each image's soft neighbourhood is, in %: 100 · (1 − SND / log(N − 1)).

    SND is `soft_neighborhood_density` (Saito et al., ICCV 2021: the mean entropy H_i of each image's softmax
    over its similarities to the others, temperature 0.05), read the other way round and scaled by its
    maximum, log(N − 1), the entropy of a uniform neighbourhood: 0 where every image is equally near all the
    others (collapsed features: SND's own favourite), 100 where each one has a single neighbour. Higher is
    better: the target-only selection score a sweep on unlabelled images ranks on by default. On re-ID
    embeddings a tight identity gives each image a few near neighbours against a crowd of far ones, so a low
    entropy; across 16 MMT trials of the embedded benchmark (seed 0) SND fell as target mAP rose (Kendall τ
    −0.55 to −0.65 at every evaluated epoch), where the mixup probe and the source-validation mAP barely
    followed it (bench/RESULTS.md, "Choosing without target labels"). A ranking, not a level: compare runs
    on the same probe pool (same N and temperature). `snd`: these features' SND, where it is already computed.
    """
    n = len(features)
    if n < 3:
        raise ReidRayError(f"neighbourhood_sharpness: needs N >= 3 images, got {n}")
    if snd is None:
        snd = soft_neighborhood_density(features, temperature, block)
    return sharpness_from_snd(snd, n)


def sharpness_from_snd(snd: float, n: int) -> float:
    """`neighbourhood_sharpness` of N images whose SND is `snd`: 100 · (1 − SND / log(N − 1))."""
    return 100.0 * (1.0 - snd / math.log(n - 1))


def feature_collapse(features: torch.Tensor, block: int = 1024) -> dict[str, float]:
    """Collapse diagnostics: {"mean_cosine": ..., "effective_rank": ...} (a diagnostic: never select with it).

    mean_cosine: mean similarity over the N(N - 1) ordered pairs i ≠ j, (‖Σ_i f_i‖² - Σ_i ‖f_i‖²) / (N(N - 1))
    (= (‖Σ f‖² - N) / (N(N - 1)) for unit rows); 1 for identical rows, 0 for orthonormal ones.
    effective_rank: exp of the entropy of the normalised singular values σ_k / Σ σ of the feature matrix
    (Roy and Vetterli, "The effective rank: a measure of effective dimensionality", EUSIPCO 2007; RankMe,
    Garrido et al., ICML 2023). σ_k² are the eigenvalues of the D×D Gram matrix Σ_i f_i f_iᵀ (float64,
    accumulated over row blocks; eigenvalues below max·D·eps count as 0). Not centered, as RankMe: identical
    rows give 1 and the D rows of an orthonormal basis give D, whereas centering would leave identical rows
    no singular value at all (0/0), give the basis D - 1, and score small isotropic noise around one point as
    full rank (it is blind to the common direction that collapse grows).
    """
    feats = _check(features, "feature_collapse")
    n, dim = feats.shape
    if n < 2:
        raise ReidRayError(f"feature_collapse: needs N >= 2 images, got {n}")
    total = torch.zeros(dim, dtype=torch.float64, device=feats.device)
    gram = torch.zeros(dim, dim, dtype=torch.float64, device=feats.device)
    for lo, hi in _blocks(n, block):
        f = feats[lo:hi].double()
        total += f.sum(0)
        gram.addmm_(f.T, f)
    mean_cosine = (float(total @ total) - float(gram.trace())) / (n * (n - 1))
    eig = torch.linalg.eigvalsh(gram)
    eig = torch.where(eig > eig.max() * dim * torch.finfo(torch.float64).eps, eig, 0.0)
    sv = eig.sqrt()
    p = sv / sv.sum()
    entropy = -float(torch.where(p > 0, p * p.log(), 0.0).sum())
    return {"mean_cosine": mean_cosine, "effective_rank": math.exp(entropy)}
