"""Pseudo-label quality against ground truth: logged for analysis, never used for training.

NMI (sklearn), pairwise precision / recall over same-cluster pairs, cluster counts.
Cluster-vs-camera NMI flags camera-driven clusters (on the synthetic benchmark, self-training did not take off
when the first refresh's cluster-vs-identity NMI was below about 0.8).
"""

from __future__ import annotations

import numpy as np


def _pairs_same(labels: np.ndarray) -> float:
    """Number of unordered same-label pairs (outliers, label -1, are singletons)."""
    lab = labels[labels >= 0]
    counts = np.unique(lab, return_counts=True)[1].astype(np.float64)
    return float((counts * (counts - 1) / 2).sum())


def cluster_quality(pred: np.ndarray, truth: np.ndarray, cameras: np.ndarray | None = None) -> dict[str, float]:
    # imported here: scikit-learn takes ~1 s to import, and every Ray worker process imports this module
    from sklearn.metrics import normalized_mutual_info_score

    pred, truth = np.asarray(pred), np.asarray(truth)
    # outliers become their own singletons for NMI
    pred_nmi = np.where(pred >= 0, pred, pred.max(initial=0) + 1 + np.arange(len(pred)))
    # joint labels: pairs with the same prediction and the same truth
    inlier = pred >= 0
    joint = np.full(len(pred), -1, dtype=np.int64)
    _, joint[inlier] = np.unique(np.stack([pred[inlier], truth[inlier]], 1), axis=0, return_inverse=True)
    tp, pred_pairs, true_pairs = _pairs_same(joint), _pairs_same(pred), _pairs_same(truth)
    out = {
        "nmi": float(normalized_mutual_info_score(truth, pred_nmi)),
        "pairwise_precision": tp / pred_pairs if pred_pairs else 0.0,
        "pairwise_recall": tp / true_pairs if true_pairs else 0.0,
        "outliers": float((pred < 0).sum()),
    }
    if cameras is not None:
        out["camera_nmi"] = float(normalized_mutual_info_score(np.asarray(cameras), pred_nmi))
    return out
