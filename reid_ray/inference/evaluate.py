"""Any checkpoint's mAP and CMC on any dataset's query/gallery split (`reid-ray evaluate`), computed as training
evaluates (`training.loop.evaluate_model`), optionally after k-reciprocal re-ranking."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from reid_ray.inference.embedder import Embedder

if TYPE_CHECKING:
    import torch
    from rich.table import Table


def evaluate_checkpoint(emb: Embedder, dataset: str, data_root: str | Path | None, *, rerank: bool = False,
                        device: torch.device | str = "cpu", k1: int = 20, k2: int = 6,
                        lambda_value: float = 0.3, visualize: int = 0,
                        visualize_out: str | Path = "ranked_lists.png") -> dict:
    """{"dataset", "query", "gallery", "plain": metrics[, "rerank": metrics][, "visualization": path]}, each
    metrics as `training.loop.evaluate_model` gives them (mAP, R1, R5, R10 in %, cmc) on the dataset's
    query/gallery; "rerank" after k-reciprocal re-ranking (`evaluation.re_ranking`) of the same features'
    distances. `visualize` > 0: that many queries' ranked lists by the plain distances
    (`evaluation.visualize.ranked_lists`), written to `visualize_out`."""
    import torch

    from reid_ray.data.readers import read_dataset
    from reid_ray.evaluation import pairwise_distance, re_ranking
    from reid_ray.training.loop import query_gallery_features, rank_metrics

    ds = read_dataset(dataset, data_root)
    cfg = dataclasses.replace(emb.cfg, loader=dataclasses.replace(emb.cfg.loader, in_memory=False))
    if not ds.labelled:  # a user's image folder: no identities, no mAP; what the model retrieves among its images
        from reid_ray.training.pictures import ranked_list_picture

        out = {"dataset": ds.name, "images": ds.train.num_rows, "labelled": False}
        if visualize > 0:
            out["visualization"] = ranked_list_picture(emb.net, ds, cfg, torch.device(device), visualize_out,
                                                       queries=visualize)
        return out
    out = {"dataset": ds.name, "query": ds.split("query").num_rows, "gallery": ds.split("gallery").num_rows}
    (qf, qp, qc), (gf, gp, gc) = query_gallery_features(emb.net, ds, cfg, torch.device(device))
    qg = pairwise_distance(qf, gf)
    out["plain"] = rank_metrics(qg, qp, gp, qc, gc)  # = training.loop.evaluate_model, from the same features
    if rerank:
        out["rerank"] = rank_metrics(re_ranking(qg, pairwise_distance(qf, qf), pairwise_distance(gf, gf), k1, k2,
                                                lambda_value), qp, gp, qc, gc)
    if visualize > 0:
        from reid_ray.evaluation.visualize import ranked_lists

        out["visualization"] = ranked_lists(ds.split("query")["path"].to_pylist(),
                                            ds.split("gallery")["path"].to_pylist(), qg, visualize_out,
                                            num_queries=visualize, q_pids=qp, g_pids=gp, q_camids=qc, g_camids=gc)
    return out


def results_table(emb: Embedder, res: dict, k1: int = 20, k2: int = 6, lambda_value: float = 0.3) -> Table:
    from rich.table import Table

    if res.get("labelled") is False:
        table = Table(title=f"{emb.method} ({emb.network}) on {res['dataset']}: {res['images']} unlabelled images")
        table.add_column("")
        table.add_row("no identity labels: no mAP or CMC (--visualize N draws what the model retrieves)")
        return table
    table = Table(title=f"{emb.method} ({emb.network}) on {res['dataset']}: {res['query']} queries, "
                        f"{res['gallery']} gallery images")
    for col in ("ranking", "mAP", "R1", "R5", "R10"):
        table.add_column(col, justify="left" if col == "ranking" else "right")
    rows = [("plain", res["plain"])]
    if "rerank" in res:
        rows.append((f"re-ranked (k1={k1}, k2={k2}, λ={lambda_value})", res["rerank"]))
    for label, m in rows:
        table.add_row(label, *(f"{m[k]:.1f}" for k in ("mAP", "R1", "R5", "R10")))
    return table
