"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with
k-reciprocal Encoding", CVPR 2017), vectorised and sparse.

    >>> final = re_ranking(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3)

Same inputs, transforms and numbers as the authors' reference formulation
(`reid_ray.evaluation.reference.reference_re_ranking`, to 1e-5):
  1. d = row-normalised squared distances over the N = Q + G probe+gallery set;
  2. R(i, k1) = k1-reciprocal neighbours of i (Eq. 4); expanded with the
     k1/2-reciprocal set of each member c when |R(c, k1/2) ∩ R(i, k1)| > 2/3
     |R(c, k1/2)| (Eq. 6);
  3. V_i = exp(-d_ij) over the expanded set, normalised to sum 1 (Eq. 7);
     local query expansion: V_i <- mean of V over i's k2 nearest (Eq. 13);
  4. Jaccard distance d_J(i, j) = 1 - Σ min(V_i, V_j) / Σ max(V_i, V_j)
     (Eq. 10-12, with Σ max = 2 - Σ min as the V rows sum to 1);
  5. final = (1 - λ) d_J + λ d (Eq. 14).

The reference builds several dense N×N matrices and loops in Python over every
image; here neighbours come from a chunked top-k, the sets are fixed-width index
tables, V is a sparse matrix and the Jaccard sums run over V's non-zeros only, so
memory grows with N·k1² rather than N², and there is no per-image Python loop.

Every step is a torch operation on one device: the inputs' own when they are torch tensors (a CUDA
distance matrix is re-ranked on its GPU), the CPU for NumPy arrays, or `device` when given. The result
is a NumPy array either way.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from reid_ray import ReidRayError
from reid_ray.evaluation.rank import _as_tensor


def _device(device, *xs) -> torch.device:
    """`device` if given, else the first torch input's device, else the CPU."""
    if device is not None:
        return torch.device(device)
    return next((x.device for x in xs if isinstance(x, torch.Tensor)), torch.device("cpu"))


def _columns_as_rows(m: torch.Tensor, c: slice, rows: int = 256) -> torch.Tensor:
    """m[:, c] transposed into a contiguous (len(c), m.shape[0]) block, copied `rows` rows of m at a time
    on a CPU (a cache-sized tile: a whole strided transpose is ~4x slower there), at once on a GPU."""
    if m.device.type != "cpu":
        return m[:, c].T.contiguous()
    out = torch.empty(c.stop - c.start, m.shape[0], dtype=m.dtype, device=m.device)
    for r in range(0, m.shape[0], rows):
        out[:, r:r + rows] = m[r:r + rows, c].T
    return out


class _Rows:
    """Row blocks of the reference's `original_dist`, computed on demand from the three blocks.

    The reference stacks D = [[qq, qg], [qgᵀ, gg]], squares it, divides each column by its
    max and transposes: row i is column i of D², over that column's max. `block` returns such rows and
    records each row's max, after which `at` reads single entries without building a block again.
    """

    def __init__(self, q_g, q_q, g_g, device: torch.device = torch.device("cpu")):
        self.q_g, self.q_q, self.g_g = (_as_tensor(x, device=device) for x in (q_g, q_q, g_g))
        self.nq, self.ng = self.q_g.shape
        self.n = self.nq + self.ng
        self.device = device
        self.row_max = torch.empty(self.n, dtype=torch.float32, device=device)

    def block(self, lo: int, hi: int) -> torch.Tensor:
        parts = []
        if lo < self.nq:  # columns lo..min(hi,nq) of D: q_q[:, c] over q_g[c, :]
            c = slice(lo, min(hi, self.nq))
            parts.append(torch.cat([_columns_as_rows(self.q_q, c), self.q_g[c, :]], 1))
        if hi > self.nq:  # columns of the gallery part: q_g[:, c] over g_g[:, c]
            c = slice(max(lo, self.nq) - self.nq, hi - self.nq)
            parts.append(torch.cat([_columns_as_rows(self.q_g, c), _columns_as_rows(self.g_g, c)], 1))
        rows = torch.cat(parts, 0).pow(2).float()
        top = rows.max(1, keepdim=True).values
        self.row_max[lo:hi] = top[:, 0]
        return rows / top

    def at(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """original_dist[i, j] for index tensors i, j of one shape (rows i must have been through `block`):
        D[j, i] from whichever input holds it, with the block's arithmetic, so bit for bit the same."""
        nq, out = self.nq, torch.empty(i.shape, dtype=self.q_g.dtype, device=self.device)
        qi, qj = i < nq, j < nq
        for m, src, a, b in ((qi & qj, self.q_q, j, i), (~qi & qj, self.q_g, j, i - nq),
                             (qi & ~qj, self.q_g, i, j - nq), (~qi & ~qj, self.g_g, j - nq, i - nq)):
            out[m] = src[a[m], b[m]]
        return out.pow(2).float() / self.row_max[i]

    def query_gallery(self, lo: int, hi: int) -> torch.Tensor:
        """original_dist[lo:hi, nq:] for query rows: q_g's rows, squared, over their rows' max."""
        return self.q_g[lo:hi].pow(2).float() / self.row_max[lo:hi, None]


def _nearest(block: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k smallest entries of each row, ties broken by index (as a stable sort)."""
    if k + 1 >= block.shape[1]:
        return torch.sort(block, dim=1, stable=True).indices[:, :k]
    vals, idx = torch.topk(block, k + 1, dim=1, largest=False, sorted=True)
    order = torch.argsort(idx, dim=1, stable=True)
    vals, idx = vals.gather(1, order), idx.gather(1, order)
    order = torch.argsort(vals, dim=1, stable=True)
    vals, idx = vals.gather(1, order), idx.gather(1, order)
    # a tie across the k-th place may hide equal entries beyond the k+1 returned: sort those rows fully
    spill = (vals[:, k - 1] == vals[:, k]).nonzero().flatten()
    if len(spill):
        idx[spill] = torch.sort(block[spill], dim=1, stable=True).indices[:, : k + 1]
    return idx[:, :k]


def _reciprocal(rank: torch.Tensor, k: int) -> torch.Tensor:
    """Mask (N, k+1): rank[i, a] is a k-reciprocal neighbour of i (i is in its top k+1 too)."""
    fwd = rank[:, : k + 1]
    me = torch.arange(len(rank), device=rank.device)[:, None, None]
    return (rank[fwd, : k + 1] == me).any(2)


def expanded_reciprocal_sets(rank: torch.Tensor, k1: int, chunk_size: int = 2048) -> torch.Tensor:
    """R*(i, k1) of every row (Eq. 6): (N, W) indices, -1 padded, no repeats.

    rank: (N, >= k1+1) nearest neighbours of each row in distance order, self first.
    """
    n = len(rank)
    kh = int(np.around(k1 / 2.0))
    recip = _reciprocal(rank, k1)                                   # (N, k1+1)
    half_recip = _reciprocal(rank, kh)                              # (N, kh+1)
    r_set = torch.where(recip, rank[:, : k1 + 1], -1)               # R(i, k1), -1 padded
    h_set = torch.where(half_recip, rank[:, : kh + 1], -1)          # R(c, k1/2), -1 padded
    h_size = half_recip.sum(1)
    expanded = []
    for lo in range(0, n, chunk_size):
        sl = slice(lo, min(lo + chunk_size, n))
        cand = rank[sl, : k1 + 1]                                   # (B, k1+1) candidates c
        c_sets = h_set[cand]                                        # (B, k1+1, kh+1)
        inter = ((c_sets[..., None] == r_set[sl][:, None, None, :]) & (c_sets[..., None] >= 0)).any(3).sum(2)
        accept = recip[sl] & (inter > 2.0 / 3.0 * h_size[cand])
        extra = torch.where(accept[..., None], c_sets, -1).flatten(1)
        expanded.append(torch.cat([r_set[sl], extra], 1))
    e_idx, _ = torch.sort(torch.cat(expanded), dim=1)
    dup = torch.zeros_like(e_idx, dtype=torch.bool)
    dup[:, 1:] = e_idx[:, 1:] == e_idx[:, :-1]
    return torch.where(dup, -1, e_idx)


def encoding_matrix(e_idx: torch.Tensor, logits: torch.Tensor, rank: torch.Tensor, k2: int) -> torch.Tensor:
    """Sparse V (Eq. 7 + local query expansion, Eq. 13) as a coalesced (N, N) COO tensor.

    logits: (N, W) = -distance at e_idx (-inf where padded); V_i = softmax over i's set.
    """
    n, dev = len(e_idx), e_idx.device
    present = e_idx >= 0
    w = torch.softmax(logits, dim=1)
    r_idx = torch.arange(n, device=dev)[:, None].expand_as(e_idx)
    v = sparse_coo(torch.stack([r_idx[present], e_idx[present]]), w[present], n)
    if k2 != 1:
        qe_rows = torch.arange(n, device=dev).repeat_interleave(k2)
        a = sparse_coo(torch.stack([qe_rows, rank[:, :k2].reshape(-1)]), torch.full((n * k2,), 1.0 / k2, device=dev), n)
        with warnings.catch_warnings():  # torch flags its sparse-sparse product as beta
            warnings.simplefilter("ignore", UserWarning)
            v = torch.sparse.mm(a, v).coalesce()
    return v


def sparse_coo(indices: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """A coalesced (n, n) COO tensor on the values' device, duplicates summed. Built without torch's invariant
    checks (the indices are in range by construction), and without the UserWarning that some torch builds
    (2.11 on CUDA, measured on the H200) print at the first sparse tensor when those checks are not enabled
    globally: a successful run prints no warnings."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled", category=UserWarning)
        return torch.sparse_coo_tensor(indices, values, (n, n), device=values.device, check_invariants=False).coalesce()


def min_overlaps(v: torch.Tensor, num_rows: int, pairs_per_chunk: int = 20_000_000, partners_from: int = 0):
    """Σ_k min(V_ik, V_jk) for rows i < num_rows and every j >= partners_from sharing a column with i
    (Eq. 11-12).

    Yields (lo, hi, i - lo, j, min) blocks of rows [lo, hi): unaggregated triples, one per
    shared column, sized to about `pairs_per_chunk`. Only V's non-zeros are visited.
    """
    n, dev = v.shape[0], v.device
    v_rows, v_cols = v.indices()
    v_vals = v.values()
    p_rows, p_cols, p_vals = v_rows, v_cols, v_vals  # the partners j: V's entries in rows >= partners_from
    if partners_from:
        keep = v_rows >= partners_from
        p_rows, p_cols, p_vals = v_rows[keep], v_cols[keep], v_vals[keep]
    by_col = torch.argsort(p_cols, stable=True)
    col_rows, col_vals = p_rows[by_col], p_vals[by_col]
    col_ptr = torch.zeros(n + 1, dtype=torch.int64, device=dev)
    col_ptr[1:] = torch.cumsum(torch.bincount(p_cols, minlength=n), 0)
    row_ptr = torch.zeros(n + 1, dtype=torch.int64, device=dev)
    row_ptr[1:] = torch.cumsum(torch.bincount(v_rows, minlength=n), 0)
    col_len = col_ptr[1:] - col_ptr[:-1]
    cost = torch.zeros(n, dtype=torch.int64, device=dev).index_add_(0, v_rows, col_len[v_cols])[:num_rows]
    lo = 0
    while lo < num_rows:
        hi = lo + 1 + int(torch.searchsorted(torch.cumsum(cost[lo + 1:], 0), max(0, pairs_per_chunk - int(cost[lo]))))
        hi = min(hi, num_rows)
        nz = slice(int(row_ptr[lo]), int(row_ptr[hi]))
        qi, qk, qv = v_rows[nz] - lo, v_cols[nz], v_vals[nz]
        seg = col_len[qk]
        src = torch.repeat_interleave(seg)  # the entry (i, k) of each triple
        # position in the column lists: the column's start plus the triple's rank within its entry's run
        pos = torch.arange(len(src), device=dev) + (col_ptr[qk] - (torch.cumsum(seg, 0) - seg))[src]
        yield lo, hi, qi[src], col_rows[pos], torch.minimum(qv[src], col_vals[pos])
        lo = hi


def re_ranking(q_g_dist, q_q_dist, g_g_dist, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
               chunk_size: int = 2048, pairs_per_chunk: int = 20_000_000, device=None) -> np.ndarray:
    """Re-ranked (Q, G) float32 distances from query-gallery, query-query and gallery-gallery ones, computed
    on `device` (default: the inputs' device when they are torch tensors, else the CPU)."""
    dev = _device(device, q_g_dist, q_q_dist, g_g_dist)
    rows = _Rows(q_g_dist, q_q_dist, g_g_dist, dev)
    n, nq = rows.n, rows.nq
    if rows.q_q.shape != (nq, nq) or rows.g_g.shape != (rows.ng, rows.ng):
        raise ReidRayError(f"re_ranking: shapes do not fit: q_g {tuple(rows.q_g.shape)}, "
                           f"q_q {tuple(rows.q_q.shape)}, g_g {tuple(rows.g_g.shape)}")
    if not 1 <= k2 <= k1 + 1 or k1 + 1 > n:
        raise ReidRayError(f"re_ranking: need 1 <= k2 <= k1 + 1 <= Q + G, got k1={k1}, k2={k2}, Q+G={n}")

    # 1. top-(k1+1) neighbours of every row, in distance order (self first)
    rank = torch.cat([_nearest(rows.block(lo, min(lo + chunk_size, n)), k1 + 1) for lo in range(0, n, chunk_size)])

    # 2. k1-reciprocal sets, expanded by the k1/2-reciprocal sets of their members
    e_idx = expanded_reciprocal_sets(rank, k1, chunk_size)

    # 3. V: Gaussian kernel weights over each expanded set (rows sum to 1), then local query expansion;
    # the distances at the sets' entries are read from the inputs (no second pass over the blocks)
    present = e_idx >= 0
    weights = torch.full(e_idx.shape, -torch.inf, device=dev)
    weights[present] = -rows.at(torch.arange(n, device=dev)[:, None].expand_as(e_idx)[present], e_idx[present])
    v = encoding_matrix(e_idx, weights, rank, k2)

    # 4. Jaccard distance of each query to every gallery image, over V's non-zeros,
    # 5. blended with the original distances, one block of queries at a time
    final = torch.empty(nq, rows.ng, dtype=torch.float32, device=dev)
    for q_lo, q_hi, i, j, m in min_overlaps(v, nq, pairs_per_chunk, partners_from=nq):
        temp_min = torch.zeros((q_hi - q_lo) * rows.ng, dtype=torch.float32, device=dev)
        temp_min.index_add_(0, i * rows.ng + (j - nq), m)
        temp_min = temp_min.view(q_hi - q_lo, rows.ng)
        jaccard = 1 - temp_min / (2 - temp_min)
        final[q_lo:q_hi] = (jaccard * (1 - lambda_value) + rows.query_gallery(q_lo, q_hi) * lambda_value
                            if lambda_value else jaccard)
    return final.cpu().numpy()
