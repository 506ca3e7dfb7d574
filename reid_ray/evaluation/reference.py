"""Slow, literal reference implementations, for tests and benchmarks only.

Each follows its paper's definition one query/image at a time, the way the
widely used reference code does; the fast versions in `rank.py` and
`rerank.py` must agree with them.
"""

from __future__ import annotations

import numpy as np


def reference_evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """Market-1501 CMC and mAP, one query at a time over a full stable sort."""
    order_all = np.argsort(distmat, axis=1, kind="stable")
    cmcs, aps = [], []
    for q in range(distmat.shape[0]):
        order = order_all[q]
        keep = ~((g_pids[order] == q_pids[q]) & (g_camids[order] == q_camids[q]))
        hits = (g_pids[order] == q_pids[q])[keep].astype(np.float64)
        if hits.sum() == 0:
            continue
        cmc = np.minimum(hits.cumsum(), 1)
        cmcs.append(cmc[:max_rank])
        precision = hits.cumsum() / np.arange(1, len(hits) + 1)
        aps.append((precision * hits).sum() / hits.sum())
    return np.mean(cmcs, axis=0), float(np.mean(aps))


def _k_reciprocal(rank, i, k):
    forward = rank[i, : k + 1]
    return np.array([c for c in forward if i in rank[c, : k + 1]], dtype=np.int64)


def reference_re_ranking(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3):
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017) with dense N x N matrices and
    per-image loops, in the authors' formulation (row-normalised squared distances)."""
    q = q_g_dist.shape[0]
    full = np.concatenate([np.concatenate([q_q_dist, q_g_dist], 1),
                           np.concatenate([q_g_dist.T, g_g_dist], 1)], 0)
    dist = np.power(full, 2).astype(np.float32)
    dist = np.transpose(dist / np.max(dist, axis=0))
    n = dist.shape[0]
    rank = np.argsort(dist, axis=1, kind="stable")
    v = np.zeros_like(dist)
    half = int(np.around(k1 / 2.0))
    for i in range(n):
        r = _k_reciprocal(rank, i, k1)
        expansion = list(r)
        for c in r:
            rc = _k_reciprocal(rank, c, half)
            if len(np.intersect1d(rc, r)) > 2.0 / 3.0 * len(rc):
                expansion.extend(rc)
        expansion = np.unique(expansion)
        w = np.exp(-dist[i, expansion])
        v[i, expansion] = w / np.sum(w)
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(0) for i in range(n)])
    # inverted index: for each column k, the images whose V has k in its support
    inverted = [np.where(v[:, k] != 0)[0] for k in range(n)]
    jaccard = np.zeros((q, n), dtype=np.float32)
    for i in range(q):
        inter = np.zeros(n, dtype=np.float32)  # sum_k min(V_ik, V_jk) for every j
        for k in np.where(v[i] != 0)[0]:
            js = inverted[k]
            inter[js] += np.minimum(v[i, k], v[js, k])
        jaccard[i] = 1 - inter / (2.0 - inter)
    final = jaccard * (1 - lambda_value) + dist[:q] * lambda_value
    return final[:, q:]
