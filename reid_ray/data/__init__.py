"""Datasets (published layouts + the embedded synthetic benchmark), transforms, samplers, loaders.

The re-ID core: never imports ray.
"""

from reid_ray.data.loader import ImageDataset, LoaderConfig, build_test_loader, build_train_loader, relabel
from reid_ray.data.readers import DatasetError, ReIDDataset, dataset_names, read_dataset
from reid_ray.data.sampler import PKSampler
from reid_ray.data.synthetic import SynthConfig, generate_synthetic
from reid_ray.data.transforms import TransformConfig

__all__ = ["read_dataset", "dataset_names", "ReIDDataset", "DatasetError", "SynthConfig", "generate_synthetic",
           "PKSampler", "ImageDataset", "LoaderConfig", "TransformConfig", "build_train_loader",
           "build_test_loader", "relabel"]
