"""Evaluation: Market-1501 CMC/mAP, k-reciprocal re-ranking, feature extraction."""

from reid_ray.evaluation.features import extract_features, pairwise_distance
from reid_ray.evaluation.rank import evaluate_rank
from reid_ray.evaluation.rerank import re_ranking

__all__ = ["evaluate_rank", "re_ranking", "extract_features", "pairwise_distance"]
