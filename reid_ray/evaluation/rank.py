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
and known from the pids, so we sort only them. Each row's range is then cut into
equal cells (one subtraction, one multiplication, a truncation: the same
non-decreasing map for every entry), one histogram of the cells counts the
entries in cells below each positive's, and only the few entries that share a
cell with a positive are compared with it exactly (ties included). That is a
handful of elementwise passes over the distances, O(Q*G), instead of the
O(Q*G*log G) argsort the reference evaluators start with.
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
                  chunk_size: int | None = None) -> tuple[np.ndarray, float]:
    """CMC curve (length `max_rank`, fractions in [0, 1]) and mAP (a fraction).

    distmat: (Q, G) distances (smaller = more similar), numpy or torch. A torch tensor on a GPU is
    evaluated there (every step is a torch op; only CUHK03's sampled CMC goes through the CPU).
    q_pids, q_camids: (Q,) ints; g_pids, g_camids: (G,) ints.
    use_metric_cuhk03: CUHK03's single-gallery-shot CMC (one random gallery image
    per identity, averaged over `num_repeats` seeded draws); AP stays Market's.
    chunk_size: queries evaluated at a time (default: about 2M distances' worth).
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
    max_rank = min(max_rank, num_g)
    chunk_size = chunk_size or max(1, (1 << 21) // max(num_g, 1))  # ~2M distances a block: cache-sized passes
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
        d, pos, rm = dist.index_select(0, idx), _packed(positives[idx]), _packed(removed[idx])
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


def _ranked_before(v, idx, t, t_idx):
    """Entry (distance v, gallery index idx) ranks before the match (t, t_idx): ties go by gallery order."""
    return (v < t) | ((v == t) & (idx < t_idx))


def _positions(d: torch.Tensor, pos: torch.Tensor, removed: torch.Tensor, cells: int | None = None,
               max_shared: float = 1 / 16):
    """1-based positions, among kept entries, of each row's matches in rank order.

    d: (B, G) distances; pos: (B, P) gallery indices of the kept matches and
    removed: (B, R) of the removed entries (same pid and camera), both -1 padded.
    Returns (positions (B, P) float64, 0 where padded; number of matches (B,)).

    Entry g is ranked before match j when d_g < t_j, or d_g == t_j and g < idx_j. Each row's
    range [min d, largest threshold] (its top cut at the 99th percentile of a sample of the row, so
    that one outlying match does not stretch it) is cut into `cells` equal cells (64 per match) by
    c(x) = (x - lo) * scale, clamped and truncated. c is the same non-decreasing
    function for every entry of a row (a subtraction and a multiplication, each rounded once), so an
    entry in a lower cell than match j's is before it and one in a higher cell is not: a histogram of
    the cells counts those. Only the entries that share a cell with a match (about P / cells of the
    row) are compared exactly, with that cell's matches. Match j's cell is read from the same cell
    table at idx_j. Rows where more than `max_shared` of the entries share a cell with a match go to
    `_positions_by_search` instead, so no input is slower than a binary search.
    """
    b, g = d.shape
    dev = d.device
    thr, tiebreak, num_rel = _sorted_thresholds(d, pos)
    p = thr.shape[1]
    present = tiebreak < g
    cells = cells or 64 * max(p, 1)
    width = cells + 2  # cell 0 also holds -inf, cell cells + 1 everything above the largest threshold
    lo = d.amin(1, keepdim=True)
    if torch.isnan(lo).any():
        raise ReidRayError("evaluate_rank: distmat contains NaN (check the features for NaN/inf)")
    if not torch.isfinite(lo).all():  # a row with -inf: its range starts at its smallest finite entry
        lo = torch.where(torch.isfinite(d), d, torch.inf).amin(1, keepdim=True)
    hi = torch.where(present & torch.isfinite(thr), thr, -torch.inf).amax(1, keepdim=True)
    sample = torch.sort(d[:, ::max(1, g // 256)], 1).values
    hi = torch.minimum(hi, sample[:, -1 - sample.shape[1] // 100, None])  # matches above: compared one by one
    span = hi - lo
    ok = torch.isfinite(span) & (span > 0)
    lo = torch.where(torch.isfinite(lo), lo, 0.0)
    scale = torch.where(ok, cells / torch.where(ok, span, 1.0), 0.0)  # no usable range: one cell, all compared
    x = d - lo
    x.mul_(scale)
    if not ok.all():
        x.nan_to_num_(nan=0.0)  # inf * 0 in a row without a range: its one cell
    x.clamp_(0, cells + 1)
    row_start = torch.arange(0, b * width, width, dtype=torch.int32, device=dev)[:, None]
    flat = x.to(torch.int32).add_(row_start).view(-1)  # truncation = floor: x >= 0
    del x
    hist = torch.bincount(flat, minlength=b * width).view(b, width)
    below_cell = torch.cumsum(hist, 1) - hist  # entries in strictly lower cells
    # each match's cell, read from the table itself (padded matches point at a dummy cell 0 of their row)
    thr_flat = flat.view(b, g).gather(1, tiebreak.clamp(max=g - 1)).long()
    thr_cell = thr_flat - row_start
    before = torch.where(present, below_cell.gather(1, thr_cell), 0)
    # the entries sharing a cell with a match are compared with that cell's matches one by one: the
    # present matches of a row are its first num_rel columns, in non-decreasing cell order, so the
    # ones in cell c are the columns [first(c), first(c) + in_cell(c)), usually a single one
    in_cell = torch.bincount(thr_flat[present], minlength=b * width)
    first = torch.cumsum(in_cell, 0) - in_cell - (torch.cumsum(num_rel, 0) - num_rel).repeat_interleave(width)
    shared = in_cell.view(b, width) > 0
    heavy = (hist * shared).sum(1) > max_shared * g
    shared[heavy] = False
    near = shared.view(-1).index_select(0, flat).view(b, g).nonzero()
    rows, cols = near.unbind(1)
    f = flat.view(b, g)[rows, cols].long()
    v, j, m = d[rows, cols], first[f], in_cell[f]
    for k in range(int(m.max()) if len(m) else 0):
        if k:  # only the entries whose cell holds more than k matches go on
            more = m > k
            rows, cols, v, j, m = rows[more], cols[more], v[more], j[more] + 1, m[more]
        hit = _ranked_before(v, cols, thr[rows, j], tiebreak[rows, j])
        before.view(-1).index_add_(0, (rows * p + j)[hit], torch.ones_like(j[hit]))
    # the removed entries were counted like kept ones: take them out (there are few)
    r_on = removed >= 0
    if r_on.any():
        rfirst = _ranked_before(d.gather(1, removed.clamp(min=0))[:, :, None], removed[:, :, None],
                                thr[:, None, :], tiebreak[:, None, :])
        before -= (rfirst & r_on[:, :, None] & present[:, None, :]).sum(1)
    position = torch.where(present, before.double() + 1, 0.0)
    if heavy.any():
        rows = heavy.nonzero()[:, 0]
        position[rows] = _positions_by_search(d[rows], pos[rows], removed[rows])[0]
    return position, num_rel.double()


def _positions_by_search(d: torch.Tensor, pos: torch.Tensor, removed: torch.Tensor):
    """`_positions` by one batched binary search of every entry among its row's thresholds.

    The rows where most entries share a cell with a match (an outlying match stretches the range, or
    the distances pile up in a few cells) come here: it costs O(G log P) a row whatever the values.
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
    position = torch.where(tiebreak < g, before.double() + 1, 0.0)
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
