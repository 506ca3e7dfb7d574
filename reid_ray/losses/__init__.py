"""Losses (Ray-free), each with its paper, formula and tensor shapes."""

from reid_ray.losses.center import CenterLoss
from reid_ray.losses.softmax import CrossEntropyLabelSmooth
from reid_ray.losses.triplet import TripletLoss, euclidean_dist

__all__ = ["CenterLoss", "CrossEntropyLabelSmooth", "TripletLoss", "euclidean_dist"]
