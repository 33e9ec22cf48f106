"""Datasets: specs (classes, resolution, normalisation) and split loaders.

spec = dataset_spec(cfg.dataset)
ds = load_split(cfg.dataset, "train", cache_dir)   # ds[i] = (normalised image, label)
idx = class_indices(ds, c)
"""

from ddist.data.layouts import dataset_spec
from ddist.data.loaders import ImageDataset, class_indices, load_split, torch_dataset
from ddist.data.spec import DatasetSpec

__all__ = ["DatasetSpec", "ImageDataset", "class_indices", "dataset_spec", "load_split", "torch_dataset"]
