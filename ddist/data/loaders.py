"""`load_split`: one split of a dataset as a torch Dataset of normalised images.

In-memory datasets hold every image as uint8 [N,C,H,W] (`ds.images`); image
files are decoded once and cached under `<cache_dir>/datasets/`. Lazy
datasets (`dataset.in_memory: false`, e.g. ImageNet) decode a file per item
and have `ds.images = None`. Both return `(normalised float [C,H,W], label)`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import Dataset

from ddist.config.schema import DatasetConfig, as_node
from ddist.data.augment import resize
from ddist.data.cache import cache_key, cached_images
from ddist.data.decode import Resize, decode_all, decode_image
from ddist.data.layouts import SplitFiles, dataset_spec, list_split
from ddist.data.spec import (
    SPLITS,
    DatasetSpec,
    as_dict,
    data_root,
    subset_size,
)
from ddist.errors import ConfigError

log = logging.getLogger("ddist")

# sklearn's digits: 8x8 images with integer values 0..16.
_DIGITS_MAX = 16.0
_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0
# The validation split (dataset.val_per_class) is one fixed draw per dataset, whatever the run's seed.
VAL_SPLIT_SEED = 0


@runtime_checkable
class ImageDataset(Protocol):
    """What every split load_split returns has: labels as a LongTensor [N], the uint8 images
    [N,C,H,W] when the split is in memory (None when items are decoded from files on access),
    and items (normalised float image [C,H,W], label)."""

    @property
    def targets(self) -> torch.Tensor: ...

    @property
    def images(self) -> torch.Tensor | None: ...

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]: ...


def torch_dataset(ds: ImageDataset) -> Dataset:
    """`ds` as the torch Dataset it is, for DataLoader and Subset (a Protocol cannot subclass Dataset)."""
    assert isinstance(ds, Dataset), f"{type(ds).__name__} is not a torch Dataset"
    return ds


class ImageTensorDataset(Dataset):
    """Images held in memory as uint8 [N,C,H,W]; items are normalised float tensors."""

    images: torch.Tensor

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, spec: DatasetSpec):
        self.images = images
        self.targets = targets
        self.spec = spec

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.spec.normalize(self.images[i].float() / 255), int(self.targets[i])


class ImageFileDataset(Dataset):
    """Images decoded from disk on access (for datasets too large to hold in memory)."""

    images = None

    def __init__(self, files: SplitFiles, resize: Resize, spec: DatasetSpec):
        self.files = files
        self.resize = resize
        self.targets = torch.tensor(files.targets, dtype=torch.long)
        self.spec = spec

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = decode_image(self.files.root / self.files.paths[i], self.spec.channels, self.resize)
        return self.spec.normalize(image.float() / 255), int(self.targets[i])


def class_indices(ds: ImageDataset, c: int) -> torch.Tensor:
    """LongTensor of the indices of `ds` whose label is `c`."""
    return class_indices_of(ds.targets, c)


def class_indices_of(targets: torch.Tensor, c: int) -> torch.Tensor:
    return torch.nonzero(targets == c).flatten()


def _to_uint8(x01: torch.Tensor) -> torch.Tensor:
    return (x01 * 255).round().clamp(0, 255).to(torch.uint8)


def _resize_uint8(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Resize a uint8 batch to resolution x resolution (bilinear, antialiased when shrinking)."""
    if images.shape[-1] == resolution and images.shape[-2] == resolution:
        return images
    return _to_uint8(resize(images.float() / 255, resolution))


def _check_channels(cfg: dict, spec: DatasetSpec, native: int) -> None:
    if spec.channels != native:
        raise ConfigError(
            f"Dataset {spec.name!r} (format {cfg['format']!r}) has {native} channel(s); set dataset.channels={native}."
        )


def _digits_split(cfg: dict, spec: DatasetSpec, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn digits scaled to [0,1], upsampled, split 80/20 stratified with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    _check_channels(cfg, spec, 1)
    digits = load_digits()
    labels = digits.target
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)),
        test_size=_DIGITS_TEST_FRACTION,
        stratify=labels,
        random_state=_DIGITS_SPLIT_SEED,
    )
    # Keep the original order inside each split, so item i is stable and readable.
    idx = torch.from_numpy(np.sort(train_idx if split == "train" else test_idx))
    x01 = torch.tensor(digits.data, dtype=torch.float32).view(-1, 1, 8, 8)[idx] / _DIGITS_MAX
    # Bilinear upsampling (no antialias needed when enlarging).
    x01 = F.interpolate(x01, size=(spec.resolution, spec.resolution), mode="bilinear", align_corners=False)
    return _to_uint8(x01), torch.from_numpy(labels).long()[idx]


_TORCHVISION_CLASSES = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}


def _torchvision_split(cfg: dict, spec: DatasetSpec, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10/100 from torchvision's pickled batches (downloaded when dataset.download)."""
    import torchvision.datasets

    if spec.name not in _TORCHVISION_CLASSES:
        raise ConfigError(
            f"format 'torchvision' supports datasets {', '.join(_TORCHVISION_CLASSES)}, "
            f"not {spec.name!r}; set dataset.name to one of them or dataset.format=folder."
        )
    _check_channels(cfg, spec, 3)
    root = data_root(cfg)
    dataset_cls = getattr(torchvision.datasets, _TORCHVISION_CLASSES[spec.name])
    try:
        ds = dataset_cls(str(root), train=split == "train", download=bool(cfg.get("download")))
    except (RuntimeError, OSError) as exc:
        raise ConfigError(
            f"Dataset {spec.name!r} is not in {root} ({exc}). Set dataset.download=true on a "
            "machine with internet, or copy the python-version archive unpacked into "
            "dataset.root; for images stored as train/<class>/ and test/<class>/ folders set "
            "dataset.format=folder and dataset.root=/path/to/them."
        ) from None
    if list(ds.classes) != list(spec.classes):
        raise ConfigError(
            f"The {spec.name} files in {root} name their classes {ds.classes[:3]}..., not the "
            f"dataset.classes {list(spec.classes[:3])}...; fix dataset.classes or dataset.root."
        )
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return _resize_uint8(images, spec.resolution), torch.tensor(ds.targets, dtype=torch.long)


def _synthetic_split(cfg: dict, spec: DatasetSpec, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`dataset.subset.per_class` uniform random images per class, the same on every call (dry runs)."""
    _, per_class = subset_size(cfg)
    if per_class is None:
        raise ConfigError("dataset.format=synthetic needs dataset.subset.per_class (the images per class to make).")
    generator = torch.Generator().manual_seed(SPLITS.index(split))
    n = spec.num_classes * per_class
    images = torch.randint(0, 256, (n, spec.channels, spec.resolution, spec.resolution), generator=generator)
    return images.to(torch.uint8), torch.arange(spec.num_classes).repeat_interleave(per_class)


def subset_indices(targets, classes: int | None, per_class: int | None) -> torch.Tensor:
    """Indices, in order, of the first `per_class` items of each label below `classes` (None: no limit)."""
    targets = torch.as_tensor(targets)
    labels = range(int(targets.max()) + 1 if classes is None else classes)
    keep = [torch.nonzero(targets == c).flatten()[:per_class] for c in labels]
    return torch.cat(keep).sort().values


def _keep(cfg: dict, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The `dataset.subset` of an in-memory split."""
    classes, per_class = subset_size(cfg)
    if classes is None and per_class is None:
        return images, targets
    idx = subset_indices(targets, classes, per_class)
    return images[idx], targets[idx]


def _keep_files(cfg: dict, files: SplitFiles) -> SplitFiles:
    """The `dataset.subset` of a split's file list (before anything is decoded)."""
    classes, per_class = subset_size(cfg)
    if classes is None and per_class is None:
        return files
    idx = subset_indices(files.targets, classes, per_class).tolist()
    return SplitFiles(files.root, tuple(files.paths[i] for i in idx), tuple(files.targets[i] for i in idx))


def load_split(
    cfg_dataset: Mapping[str, Any] | DictConfig | DatasetConfig, split: str, cache_dir: Path | str | None = None
) -> ImageDataset:
    """One split ("train" | "val" | "test") of the configured dataset.

    Items are (float [C,H,W] normalised with the spec's mean/std, int label);
    `ds.targets` is a LongTensor [N] and `ds.images` the uint8 [N,C,H,W]
    tensor when the split is in memory (None otherwise). Decoded image files
    are cached under `<cache_dir>/datasets/` when `cache_dir` is given.
    `dataset.subset` keeps the first `per_class` items of each of the first `classes` labels.
    `dataset.val_per_class` carves that many images of each class out of train (after the
    subset): "val" is those, "train" the rest, so every user of "train" (teacher, class
    statistics, random-real picks, real initialisation) never sees a validation image.
    """
    cfg = as_dict(cfg_dataset if isinstance(cfg_dataset, Mapping) else as_node(cfg_dataset))
    if split not in (*SPLITS, "val"):
        raise ConfigError(f"Unknown split {split!r}; use one of {', '.join((*SPLITS, 'val'))}.")
    per_class = val_size(cfg)
    if split == "test" or (split == "train" and not per_class):
        return _load(cfg, split, cache_dir)
    if not per_class:
        raise ConfigError(
            "The validation split needs dataset.val_per_class (images per class carved from train); "
            "set it (e.g. dataset.val_per_class=10) or score on the test split (evaluate.split=test)."
        )
    train = _load(cfg, "train", cache_dir)
    val = val_indices(train.targets, dataset_spec(cfg).num_classes, per_class)
    if split == "val":
        return _take(train, val)
    rest = torch.ones(len(train.targets), dtype=torch.bool)
    rest[val] = False
    return _take(train, torch.nonzero(rest).flatten())


def val_size(cfg: dict) -> int:
    """`dataset.val_per_class` as an int (0: no validation split)."""
    value = cfg.get("val_per_class") or 0
    if not isinstance(value, int) or value < 0:
        raise ConfigError(f"dataset.val_per_class={value!r} must be an integer >= 0 (or null: no validation split).")
    return value


def val_indices(targets: torch.Tensor, num_classes: int, per_class: int) -> torch.Tensor:
    """Sorted train indices of the validation split: `per_class` random images of each class,
    drawn with a fixed seed, so every run, seed and method of a dataset shares one split."""
    pools = [class_indices_of(targets, c) for c in range(num_classes)]
    counts = [len(pool) for pool in pools]
    smallest = min(range(num_classes), key=counts.__getitem__)  # named, as ipc's check names it
    if counts[smallest] <= per_class:
        short = sum(n <= per_class for n in counts)
        raise ConfigError(
            f"dataset.val_per_class={per_class} leaves class {smallest} no training images: the smallest class "
            f"has {counts[smallest]} ({short} class(es) have {per_class} or fewer); "
            f"set dataset.val_per_class below {counts[smallest]}."
        )
    generator = torch.Generator().manual_seed(VAL_SPLIT_SEED)
    picked = [pool[torch.randperm(len(pool), generator=generator)[:per_class]] for pool in pools]
    return torch.cat(picked).sort().values


def _take(ds: ImageDataset, idx: torch.Tensor) -> ImageDataset:
    """The items `idx` of a split, in memory or as a file list."""
    if isinstance(ds, ImageFileDataset):
        files = ds.files
        keep = idx.tolist()
        picked = SplitFiles(files.root, tuple(files.paths[i] for i in keep), tuple(files.targets[i] for i in keep))
        return ImageFileDataset(picked, ds.resize, ds.spec)
    assert isinstance(ds, ImageTensorDataset)
    return ImageTensorDataset(ds.images[idx], ds.targets[idx], ds.spec)


def _load(cfg: dict, split: str, cache_dir: Path | str | None) -> ImageDataset:
    """One split as stored ("train" | "test"), cut to dataset.subset."""
    fmt = cfg["format"]
    spec = dataset_spec(cfg)
    # the files and tensors are read as the whole dataset's, then cut to dataset.subset
    whole = {**cfg, "subset": None}
    if fmt == "synthetic":
        return ImageTensorDataset(*_synthetic_split(cfg, spec, split), spec)
    if fmt == "digits":
        return ImageTensorDataset(*_keep(cfg, *_digits_split(whole, dataset_spec(whole), split)), spec)
    if fmt == "torchvision":
        return ImageTensorDataset(*_keep(cfg, *_torchvision_split(whole, dataset_spec(whole), split)), spec)

    files = _keep_files(cfg, list_split(whole, dataset_spec(whole), split))
    resize = Resize.for_split(fmt, split, spec.resolution)
    if not cfg["in_memory"]:
        return ImageFileDataset(files, resize, spec)
    targets = torch.tensor(files.targets, dtype=torch.long)
    labels = spec.wnids if spec.wnids is not None else spec.classes
    key = cache_key(fmt, split, spec.channels, resize, labels, files)

    def decode() -> torch.Tensor:
        log.info(
            "decoding %d %s images of %s from %s (cached afterwards)",
            len(files.paths),
            split,
            spec.name,
            files.root,
        )
        return decode_all(files.root, files.paths, spec.channels, resize, desc=f"decode {spec.name} {split}")

    images = cached_images(None if cache_dir is None else Path(cache_dir), key, decode, targets)
    return ImageTensorDataset(images, targets, spec)
