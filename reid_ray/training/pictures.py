"""The pictures a training run logs to MLflow (`evaluation.visualize` draws them): the ranked lists of its final
network at the end of the run, and (`clustering.client.cluster_picture`) the target features of each refresh.

    ranked_list_picture(model, dataset, cfg, device, "run/ranked_lists.png")

On a dataset with identities: seeded queries of its query split against its whole gallery, each gallery image
bordered green (same identity) or red, Market-1501's same-camera matches left out as evaluation leaves them out.
On a user's image folder (no identities): seeded images of the folder against up to `pool` of its images (itself
left out), plain borders: what the model retrieves, with nothing to score it by.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from reid_ray.config import TrainConfig
from reid_ray.data.loader import build_test_loader
from reid_ray.data.readers import ReIDDataset


def ranked_list_picture(model: torch.nn.Module, dataset: ReIDDataset, cfg: TrainConfig, device: torch.device,
                        out_path: str | Path, *, queries: int = 8, top: int = 10, pool: int = 2000,
                        seed: int = 0) -> Path:
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # RNG-neutral, as the label-free scores (training/label_free.py)
        return _draw(model, dataset, cfg, device, out_path, queries, top, pool, seed)


def _draw(model, dataset: ReIDDataset, cfg: TrainConfig, device: torch.device, out_path, queries: int, top: int,
          pool: int, seed: int) -> Path:
    from reid_ray.evaluation import extract_features, pairwise_distance
    from reid_ray.evaluation.visualize import ranked_lists

    def features(table: pa.Table):
        return extract_features(model, build_test_loader(table, cfg.transform, cfg.loader), device=device)

    rng = np.random.default_rng(seed)
    if dataset.labelled:
        q_all, g = dataset.split("query"), dataset.split("gallery")
        q = q_all.take(pa.array(np.sort(rng.choice(q_all.num_rows, min(queries, q_all.num_rows), replace=False))))
        (qf, qp, qc), (gf, gp, gc) = features(q), features(g)
        return ranked_lists(q["path"].to_pylist(), g["path"].to_pylist(), pairwise_distance(qf, gf), out_path,
                            num_queries=queries, top=top, q_pids=qp, g_pids=gp, q_camids=qc, g_camids=gc, seed=seed)
    from reid_ray.training.label_free import probe_subset

    t = probe_subset(dataset.train, pool, seed)  # the label-free probe's draw: the same images for the same seed
    f, _, _ = features(t)
    paths = t["path"].to_pylist()
    return ranked_lists(paths, paths, pairwise_distance(f, f), out_path, num_queries=queries, top=top, seed=seed,
                        exclude_self=True)
