"""Backbones and re-ID heads (Ray-free)."""

from reid_ray.models.backbone import ARCHS, build_backbone
from reid_ray.models.reid_net import ModelConfig, ReIDNet, build_reid_net

__all__ = ["ARCHS", "build_backbone", "ModelConfig", "ReIDNet", "build_reid_net"]
