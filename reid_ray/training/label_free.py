"""The label-free scores of an evaluation (`training.loop` evaluates, the worker logs): what a run or a sweep can
rank on when the target has no labels. The scores themselves, with their formulas and sources, are
`evaluation.label_free`'s; this module picks the fixed images they are computed on and runs the network.

    scores = label_free_scores(method, cfg)   # {"source_val_mAP": ..., "target_probe": ..., "target_sharpness": ..., ...}

- `source_val_mAP`: mAP on `label_free.source_val_ids` of the source's held-out identities (its query/gallery
  split, whose identities its training split never holds), drawn with `label_free.seed`. It needs no target label.
  Formula: the ordinary retrieval mAP (`evaluation.rank_metrics`), mean over the subset's queries of the average
  precision of their gallery ranking, on source identities. Source: source-domain validation as a UDA model
  selector, the simple baseline that Musgrave et al. (2022, arXiv 2208.07360, a benchmark of UDA validators)
  found hard to beat, and what HyPASS (IEEE Access 2021) selects re-ID models with.
- `target_probe`: the target-only mixup probe on `label_free.probe_images` target training images.
- `target_sharpness`: the neighbourhood sharpness of the same probe pool, 100 · (1 − SND / log(N − 1)), the
  default label-free score (`config.LABEL_FREE_DEFAULT`).
- diagnostics, logged and never ranked on: the probe pool's soft neighbourhood density in its published direction
  (`target_snd`), mean pairwise cosine (`target_mean_cosine`) and effective rank (`target_effective_rank`), a check
  for collapse.

The subsets depend on `label_free.seed` only (not on the run's seed), so every trial of a sweep, and every seed, is
scored on the same images. Their cost is bounded by the subset sizes, whatever the dataset's size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

from reid_ray import atomic_path
from reid_ray.config import TrainConfig
from reid_ray.data.loader import build_test_loader
from reid_ray.data.readers import ReIDDataset

PROBE_FEATURES = "probe_features.npy"  # a run's probe-pool features of an evaluation, under its epoch<N>/ folder


def identity_subset(dataset: ReIDDataset, ids: int, seed: int) -> tuple[pa.Table, pa.Table]:
    """(query, gallery) of `ids` of the dataset's test identities drawn with `seed` (all when it has fewer)."""
    q, g = dataset.split("query"), dataset.split("gallery")
    pids = np.unique(q["pid"].to_numpy())
    pids = pids[pids > 0]  # Market's distractors (0) have no query
    if len(pids) > ids:
        pids = np.sort(np.random.default_rng(seed).choice(pids, ids, replace=False))
    keep = pa.array(pids)
    return q.filter(pc.is_in(q["pid"], keep)), g.filter(pc.is_in(g["pid"], keep))


def probe_subset(table: pa.Table, n: int, seed: int) -> pa.Table:
    """`n` rows of the target's training table drawn with `seed`, in table order (all when it has fewer)."""
    if table.num_rows <= n:
        return table
    rows = np.sort(np.random.default_rng(seed).choice(table.num_rows, n, replace=False))
    return table.take(pa.array(rows))


def _images(table: pa.Table, cfg: TrainConfig) -> torch.Tensor:
    """The table's images through the test transform, as one (N, C, H, W) tensor on the CPU."""
    return torch.cat([b["img"] for b in build_test_loader(table, cfg.transform, cfg.loader)])


_POOLS: dict[str, torch.Tensor] = {}  # the probe pool's images, decoded once per process (every evaluation reuses them)


def _probe_images(key: str, table: pa.Table, cfg: TrainConfig) -> torch.Tensor:
    if key not in _POOLS:
        _POOLS.clear()
        _POOLS[key] = _images(table, cfg)
    return _POOLS[key]


def label_free_scores(model: torch.nn.Module, source: ReIDDataset | None, target: ReIDDataset, cfg: TrainConfig,
                      device: torch.device, source_mAP: float | None = None,
                      features_out: str | Path | None = None) -> dict[str, float]:
    """The evaluation's label-free scores of `model` (the method's evaluated network), in %, plus diagnostics.
    RNG-neutral: torch's generators are restored afterwards (its loaders draw a seed from them), so a run trains the
    same batches with the scores on or off, and a resumed run (whose probe pool is decoded again) exactly as one
    that was never stopped.
    `source_mAP`: the same network's mAP on the whole source test split where this evaluation computed it: the
    source-validation mAP is that figure when the subset is the whole split (no second pass). `features_out`: where
    to keep the probe pool's features (float16 .npy), the input of a sweep's ensemble agreement."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        return _scores(model, source, target, cfg, device, source_mAP, features_out)


def _scores(model, source, target, cfg: TrainConfig, device: torch.device, source_mAP, features_out) -> dict[str, float]:
    from reid_ray.evaluation.label_free import (
        feature_collapse,
        mixup_probe,
        neighbourhood_sharpness,
        soft_neighborhood_density,
    )
    from reid_ray.training.loop import rank_metrics

    lf = cfg.label_free
    out: dict[str, float] = {}
    if source is not None:
        from reid_ray.evaluation import extract_features, pairwise_distance

        q, g = identity_subset(source, lf.source_val_ids, lf.seed)
        if source_mAP is not None and (q.num_rows, g.num_rows) == (source.query.num_rows, source.gallery.num_rows):
            out["source_val_mAP"] = float(source_mAP)
        else:
            (qf, qp, qc), (gf, gp, gc) = [extract_features(model, build_test_loader(t, cfg.transform, cfg.loader),
                                                           device=device) for t in (q, g)]
            out["source_val_mAP"] = float(rank_metrics(pairwise_distance(qf, gf), qp, gp, qc, gc)["mAP"])
    pool = probe_subset(target.train, lf.probe_images, lf.seed)
    images = _probe_images(f"{target.name}|{target.train.num_rows}|{lf.probe_images}|{lf.seed}|{cfg.transform}", pool,
                           cfg)
    was_training = model.training
    model.eval()
    try:
        def embed(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return F.normalize(model(x.to(device)).float(), dim=1).cpu()

        feats = torch.cat([embed(images[i:i + cfg.loader.test_batch_size])
                           for i in range(0, len(images), cfg.loader.test_batch_size)])
        if not torch.isfinite(feats).all():  # a network gone NaN (the loop stops it): no score to give
            return {**out, "target_probe": float("nan"), "target_sharpness": float("nan")}
        out["target_probe"] = float(mixup_probe(embed, images, pairs=lf.probe_pairs, lam=lf.probe_lam, seed=lf.seed,
                                                pool=feats))
    finally:
        model.train(was_training)
    if features_out is not None:
        Path(features_out).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(Path(features_out)) as tmp, open(tmp, "wb") as f:
            np.save(f, feats.numpy().astype(np.float16))
    collapse = feature_collapse(feats)
    snd = soft_neighborhood_density(feats)
    out.update(target_sharpness=float(neighbourhood_sharpness(feats, snd=snd)), target_snd=float(snd),
               target_mean_cosine=float(collapse["mean_cosine"]), target_effective_rank=float(collapse["effective_rank"]))
    return out


def sweep_agreement(run_dirs: dict[str, Path], k: int = 20) -> dict[int, dict[str, float]]:
    """The ensemble agreement of a sweep's trials (`evaluation.label_free.ensemble_agreement`), at every evaluated
    epoch that at least two trials reached (ASHA's rungs and the last epoch among them): {epoch: {trial: score}}.
    `run_dirs`: each trial's run folder, where each evaluation kept its probe pool's features (PROBE_FEATURES)."""
    from reid_ray.evaluation.label_free import ensemble_agreement

    found: dict[int, dict[str, Path]] = {}
    for trial, folder in run_dirs.items():
        for f in Path(folder).glob(f"epoch*/{PROBE_FEATURES}"):
            found.setdefault(int(f.parent.name.removeprefix("epoch")), {})[trial] = f
    out = {}
    for epoch, files in sorted(found.items()):
        if len(files) < 2:
            continue
        trials = sorted(files)
        feats = [torch.from_numpy(np.load(files[t]).astype(np.float32)) for t in trials]
        if len({tuple(f.shape) for f in feats}) != 1:
            continue  # trials that differ in their probe pool or feature size cannot be compared
        scores = ensemble_agreement(feats, k=min(k, len(feats[0]) - 1))
        out[epoch] = dict(zip(trials, scores, strict=True))
    return out
