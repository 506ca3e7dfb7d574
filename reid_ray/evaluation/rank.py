"""CMC and mAP under the Market-1501 protocol, vectorised.

    >>> cmc, mAP = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids)
    >>> cmc[0], cmc[4], mAP          # rank-1, rank-5, mean average precision

Protocol (Zheng et al., ICCV 2015; the one torchreid/fast-reid/OpenUnReID implement):
for each query, gallery entries with the query's pid AND camera are removed; a
query with no remaining match is skipped; the CMC of a query is 1 from the rank
of its first match on (so clipped at 1); AP is the mean of the precision at each
match. Ties in distance are broken by gallery order (as a stable sort would).

How it is fast without a per-query loop or a full sort of every row: AP only
needs, for each positive (match) p of a query, its position among the kept
entries = 1 + #{kept g ranked before p}. The positives of every query are few
and known from the pids, so we sort only them and count, for each row, how many
kept entries fall below each positive with one batched `searchsorted` and one
histogram: O(Q·G·log P) instead of the O(Q·G·log G) argsort the reference
evaluators start with.
"""

from __future__ import annotations

import numpy as np
import torch

from reid_ray import ReidRayError


def _as_tensor(x, dtype=None, device=None) -> torch.Tensor:
    """A torch view of `x`, kept where it is (a GPU tensor stays on its GPU) unless `device` is given."""
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t.to(device=device, dtype=dtype)


def _match_tables(q_pids, g_pids, q_camids, g_camids):
    """Gallery indices of each query's matches, split by camera; (Q, P) int64, -1 padded.

    Returns (kept matches: same pid, other camera; removed: same pid, same camera).
    Built from per-pid groups of the gallery, so it costs O(Q·P), not O(Q·G).
    """
    g_order = torch.argsort(g_pids, stable=True)  # gallery indices grouped by pid, in index order
    uniq, counts = torch.unique_consecutive(g_pids[g_order], return_counts=True)
    width = int(counts.max()) if len(counts) else 1
    starts = torch.cumsum(counts, 0) - counts
    col = torch.arange(width, device=g_pids.device)
    # groups[k, :counts[k]] = gallery indices of pid uniq[k]
    groups = torch.where(col[None, :] < counts[:, None],
                         g_order[(starts[:, None] + col[None, :]).clamp(max=len(g_order) - 1)], -1)
    slot = torch.searchsorted(uniq, q_pids).clamp(max=len(uniq) - 1)
    same_pid = torch.where((uniq[slot] == q_pids)[:, None], groups[slot], -1)
    same_cam = (same_pid >= 0) & (g_camids[same_pid.clamp(min=0)] == q_camids[:, None])
    return torch.where(same_cam, -1, same_pid), torch.where(same_cam, same_pid, -1)


def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank: int = 50,
                  use_metric_cuhk03: bool = False, num_repeats: int = 10, seed: int = 0,
                  chunk_size: int = 512) -> tuple[np.ndarray, float]:
    """CMC curve (length `max_rank`, fractions in [0, 1]) and mAP (a fraction).

    distmat: (Q, G) distances (smaller = more similar), numpy or torch. A torch tensor on a GPU is
    evaluated there (every step is a torch op; only CUHK03's sampled CMC goes through the CPU).
    q_pids, q_camids: (Q,) ints; g_pids, g_camids: (G,) ints.
    use_metric_cuhk03: CUHK03's single-gallery-shot CMC (one random gallery image
    per identity, averaged over `num_repeats` seeded draws); AP stays Market's.
    """
    dist = _as_tensor(distmat)
    if not dist.is_floating_point():
        dist = dist.double()
    dev = dist.device
    q_pids, g_pids = _as_tensor(q_pids, torch.int64, dev), _as_tensor(g_pids, torch.int64, dev)
    q_camids, g_camids = _as_tensor(q_camids, torch.int64, dev), _as_tensor(g_camids, torch.int64, dev)
    num_q, num_g = dist.shape
    if (len(q_pids), len(q_camids), len(g_pids), len(g_camids)) != (num_q, num_q, num_g, num_g):
        raise ReidRayError(f"evaluate_rank: distmat is {num_q}x{num_g} but got {len(q_pids)} query pids, "
                           f"{len(q_camids)} query cams, {len(g_pids)} gallery pids, {len(g_camids)} gallery cams")
    if torch.isnan(dist).any():
        raise ReidRayError("evaluate_rank: distmat contains NaN (check the features for NaN/inf)")
    max_rank = min(max_rank, num_g)
    positives, removed = _match_tables(q_pids, g_pids, q_camids, g_camids)
    # queries in order of their number of matches (Market's protocol: CUHK03's draws follow query order), so
    # that each block's tables are only as wide as its own widest row; queries without a match are skipped
    counts = (positives >= 0).sum(1)
    order = torch.arange(num_q, device=dev) if use_metric_cuhk03 else torch.argsort(counts, stable=True)
    order = order[counts[order] > 0]
    all_cmc, all_ap = [], []
    rng = np.random.default_rng(seed)
    for lo in range(0, len(order), chunk_size):
        idx = order[lo:lo + chunk_size]
        d, pos, rm = dist[idx], _packed(positives[idx]), _packed(removed[idx])
        position, num_rel = _positions(d, pos, rm)
        hit_no = torch.arange(1, position.shape[1] + 1, dtype=torch.float64, device=dev)
        ap = torch.where(position > 0, hit_no / position.clamp(min=1), 0.0).sum(1) / num_rel
        all_ap.append(ap)
        if use_metric_cuhk03:
            keep = ~((g_pids[None, :] == q_pids[idx, None]) & (g_camids[None, :] == q_camids[idx, None]))
            all_cmc.append(_cuhk03_cmc(d.cpu(), keep.cpu(), q_pids[idx].cpu(), g_pids.cpu(), max_rank,
                                       num_repeats, rng).to(dev))
        else:
            first = position[:, 0]  # 1-based position of the first match
            all_cmc.append((first[:, None] <= torch.arange(1, max_rank + 1, device=dev)[None, :]).double())
    if not all_ap:
        raise ReidRayError("evaluate_rank: no query has a match in the gallery (check pids and cameras)")
    return torch.cat(all_cmc).mean(0).cpu().numpy().astype(np.float32), float(torch.cat(all_ap).mean())


def _packed(table: torch.Tensor) -> torch.Tensor:
    """A -1 padded index table with each row's entries first, cut to its widest row (at least 1 column)."""
    table = torch.sort(table, dim=1, descending=True).values
    return table[:, :max(1, int((table >= 0).sum(1).max()))] if len(table) else table


def _sorted_thresholds(d, pos):
    """Distances of each row's matches sorted by (distance, gallery index); +inf padding last."""
    present = pos >= 0
    idx = pos.clamp(min=0)
    thr = torch.where(present, d.gather(1, idx), torch.tensor(float("inf"), dtype=d.dtype, device=d.device))
    tiebreak = torch.where(present, idx, d.shape[1])
    order = torch.argsort(tiebreak, dim=1, stable=True)
    thr, tiebreak = thr.gather(1, order), tiebreak.gather(1, order)
    order = torch.argsort(thr, dim=1, stable=True)
    return thr.gather(1, order).contiguous(), tiebreak.gather(1, order), present.sum(1)


def _positions(d: torch.Tensor, pos: torch.Tensor, removed: torch.Tensor):
    """1-based positions, among kept entries, of each row's matches in rank order.

    d: (B, G) distances; pos: (B, P) gallery indices of the kept matches and
    removed: (B, R) of the removed entries (same pid and camera), both -1 padded.
    Returns (positions (B, P) float64, 0 where padded; number of matches (B,)).
    """
    b, g = d.shape
    dev = d.device
    d = d.contiguous()
    thr, tiebreak, num_rel = _sorted_thresholds(d, pos)
    p = thr.shape[1]
    # entry g is ranked before match j if d_g < t_j, i.e. j >= #(thresholds <= d_g):
    # one batched binary search and one histogram over every entry of the block
    bins = torch.searchsorted(thr, d, right=True, out_int32=True)  # (B, G) in [0, P]
    # row-major (B, P + 1) slots, int32: the histogram's bins and, below, the tie lookup's index
    row_start = torch.arange(0, b * (p + 1), p + 1, dtype=torch.int32, device=dev)[:, None]
    flat = (bins + row_start).view(-1)
    hist = torch.bincount(flat, minlength=b * (p + 1)).view(b, p + 1)
    # the removed entries were counted too: take them out (there are few)
    r_on = removed >= 0
    if r_on.any():
        r_bins = torch.searchsorted(thr, d.gather(1, removed.clamp(min=0)).contiguous(), right=True)
        hist.view(-1).index_add_(0, (r_bins + row_start)[r_on], torch.full((int(r_on.sum()),), -1, dtype=hist.dtype,
                                                                            device=dev))
    before = torch.cumsum(hist, 1)[:, :p]
    # ties (d_g == t_j): g is before match j only if g < idx_j. Every match ties with itself.
    thr_low = torch.cat([torch.full((b, 1), -torch.inf, dtype=d.dtype, device=dev), thr], 1)  # [k] = t_{k-1}
    # the threshold just below each entry, looked up by the int32 slots (index_select takes them as they are;
    # gather would need an int64 copy of the whole block)
    below = thr_low.view(-1).index_select(0, flat).view(b, g)
    rows, cols = (below == d).nonzero(as_tuple=True)
    not_removed = ~((removed[rows] == cols[:, None]) & r_on[rows]).any(1)
    rows, cols = rows[not_removed], cols[not_removed]
    tb, dv = bins[rows, cols].long(), d[rows, cols]
    for back in range(1, p + 1):
        jj = (tb - back).clamp(min=0)
        ok = (tb - back >= 0) & (thr[rows, jj] == dv)
        if not ok.any():
            break
        before.index_put_((rows[ok], jj[ok]), (cols[ok] < tiebreak[rows[ok], jj[ok]]).long(), accumulate=True)
    position = torch.where(torch.isfinite(thr), before.double() + 1, 0.0)
    return position, num_rel.double()


def _cuhk03_cmc(d, keep, q_pids, g_pids, max_rank, num_repeats, rng):
    """Single-gallery-shot CMC: per repeat, one random kept gallery image per identity."""
    g_order = torch.argsort(g_pids, stable=True)
    _, counts = torch.unique_consecutive(g_pids[g_order], return_counts=True)
    starts = (torch.cumsum(counts, 0) - counts).numpy()
    d_sorted, keep_sorted, pid_sorted = d[:, g_order], keep[:, g_order], g_pids[g_order]
    match = pid_sorted[None, :] == q_pids[:, None]
    cmc = torch.zeros(d.shape[0], max_rank, dtype=torch.float64)
    for _ in range(num_repeats):
        key = torch.from_numpy(rng.random(d.shape)).masked_fill(~keep_sorted, -1.0)
        best = np.maximum.reduceat(key.numpy(), starts, axis=1)
        sampled = keep_sorted & (key == torch.from_numpy(np.repeat(best, counts.numpy(), axis=1)))
        # every query has a kept match here, so exactly one sampled match per row
        d_match = torch.where(sampled & match, d_sorted, torch.inf).min(1).values
        rank = (sampled & (d_sorted < d_match[:, None])).sum(1) + 1
        cmc += (rank[:, None] <= torch.arange(1, max_rank + 1)[None, :]).double()
    return cmc / num_repeats
