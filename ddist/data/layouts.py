"""Where the image files of each on-disk layout are, which label each gets, and the dataset
spec a config makes (`dataset_spec`: it reads the class list from disk when the config has none).

Layouts (`dataset.format`):
  folder           <root>/train/<class>/**, <root>/test/<class>/**
  imagenet         <root>/train/<wnid>/**,  <root>/val/<wnid>/**
  imagenet_subset  as imagenet; only the wnids in `dataset.wnids` are read
  tiny_imagenet    tiny-imagenet-200: wnids.txt, train/<wnid>/images/*,
                   val/images/* labelled by val/val_annotations.txt

Label order: the config's `wnids` (or `classes`) list when given, matched to
folders by name; otherwise the sorted folder names (torchvision ImageFolder
order); for tiny_imagenet the line order of wnids.txt.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig

from ddist.data.spec import DatasetSpec, as_dict, data_root, per_channel, subset_size
from ddist.errors import ConfigError

# Same suffixes torchvision's ImageFolder accepts.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Folder name of each split per layout (ImageNet calls its test split "val").
_SPLIT_DIRS = {
    "folder": {"train": "train", "test": "test"},
    "imagenet": {"train": "train", "test": "val"},
    "imagenet_subset": {"train": "train", "test": "val"},
    "tiny_imagenet": {"train": "train", "test": "val"},
}

# What to download for each layout, quoted in the missing-data error.
_HOW_TO_GET = {
    "folder": "Put the images in <root>/train/<class>/ and <root>/test/<class>/ "
    "(one folder per class; folder names are the class names)",
    "imagenet": "Download ILSVRC2012 from the ImageNet site (it needs an account) and arrange "
    "both train/ and val/ as one folder per wnid (the usual val preparation script does this)",
    "imagenet_subset": "Use an ImageNet folder (train/<wnid>/ and val/<wnid>/) or the fast.ai "
    "imagenette2 / imagewoof2 archive unpacked (it has the same train/ and val/ layout)",
    "tiny_imagenet": "Download tiny-imagenet-200.zip from the CS231n site and unzip it; "
    "dataset.root must be the tiny-imagenet-200 folder that holds wnids.txt",
}


@dataclass(frozen=True)
class SplitFiles:
    """The files of one split: paths relative to `root`, with their labels."""

    root: Path
    paths: tuple[str, ...]
    targets: tuple[int, ...]


def missing_data(cfg: dict, what: Path) -> ConfigError:
    """The one-paragraph error for data that is not where the config says."""
    fmt = cast(str, cfg["format"])  # one of the schema's formats
    return ConfigError(
        f"Dataset {cfg.get('name')!r} (format {fmt!r}): {what} does not exist. "
        f"{_HOW_TO_GET[fmt]}, then set dataset.root=/path/to/it "
        f"(now dataset.root={cfg.get('root')!r})."
    )


def _existing_dir(cfg: dict, path: Path) -> Path:
    if not path.is_dir():
        raise missing_data(cfg, path)
    return path


def _subdirs(path: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _images_under(root: Path, folder: Path) -> list[str]:
    """Image files below `folder` (recursively) as posix paths relative to `root`, sorted
    so loading is deterministic. Plain strings: pathlib costs seconds on 100k files."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        found.extend(f"{rel_dir}/{f}" for f in sorted(filenames) if f.lower().endswith(IMG_EXTENSIONS))
    return found


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _tiny_classes(cfg: dict, root: Path) -> tuple[list[str], list[str]]:
    """Tiny-ImageNet label order = wnids.txt order; names from words.txt when present."""
    wnids_file = root / "wnids.txt"
    if not wnids_file.is_file():
        raise missing_data(cfg, wnids_file)
    wnids = _read_lines(wnids_file)
    names = dict.fromkeys(wnids)
    words = root / "words.txt"
    if words.is_file():
        for line in _read_lines(words):
            wnid, _, text = line.partition("\t")
            if wnid in names:
                # words.txt lists synonyms ("tabby, tabby cat"); the first is the name.
                names[wnid] = text.split(",")[0].strip()
    return [names[w] or w for w in wnids], wnids


def discover_classes(cfg: dict) -> tuple[list[str], list[str] | None]:
    """(classes, wnids) read from disk, for configs with `classes: null`."""
    fmt = cfg["format"]
    if fmt == "tiny_imagenet":
        return _tiny_classes(cfg, _existing_dir(cfg, data_root(cfg)))
    if fmt in ("folder", "imagenet"):
        train = _existing_dir(cfg, data_root(cfg) / _SPLIT_DIRS[fmt]["train"])
        names = _subdirs(train)
        if not names:
            raise ConfigError(
                f"{train} has no class folders; set dataset.root to a folder whose train/ "
                "holds one sub-folder per class."
            )
        # ImageNet folders are named by wnid; human names are not on disk.
        return names, (names if fmt == "imagenet" else None)
    if fmt == "imagenet_subset" and cfg.get("wnids"):
        return list(cfg["wnids"]), list(cfg["wnids"])
    if fmt == "synthetic" and cfg.get("num_classes"):
        return [f"class_{i}" for i in range(cfg["num_classes"])], None
    raise ConfigError(
        f"Dataset {cfg.get('name')!r} (format {fmt!r}) cannot find its classes on disk: "
        "set dataset.classes (and dataset.wnids for ImageNet subsets) in the dataset config."
    )


def _class_folders(cfg: dict, spec: DatasetSpec, split_dir: Path) -> list[Path]:
    """One folder per label, matched by name so label order never depends on the disk."""
    names = spec.wnids if spec.wnids is not None else spec.classes
    on_disk = set(_subdirs(split_dir))
    for name in names:
        if name not in on_disk:
            raise ConfigError(
                f"Class folder {name!r} of dataset {spec.name!r} is missing from {split_dir}. "
                "Set dataset.root to a folder that has it (the classes, in label order, are "
                "dataset.wnids or dataset.classes)."
            )
    extra = sorted(on_disk - set(names))
    # A subset reads a few wnids from a full ImageNet folder; elsewhere extra
    # folders mean the root points at a different dataset.
    if extra and cfg["format"] != "imagenet_subset":
        raise ConfigError(
            f"{split_dir} has class folders that dataset {spec.name!r} does not list: "
            f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}. Set dataset.root to "
            "the intended data, or dataset.classes=null to take the classes from the folders."
        )
    return [split_dir / name for name in names]


def _folder_split(cfg: dict, spec: DatasetSpec, split: str) -> SplitFiles:
    root = data_root(cfg)
    split_dir = _existing_dir(cfg, root / _SPLIT_DIRS[cfg["format"]][split])
    paths, targets = [], []
    for label, folder in enumerate(_class_folders(cfg, spec, split_dir)):
        files = _images_under(root, folder)
        paths.extend(files)
        targets.extend([label] * len(files))
    if not paths:
        raise ConfigError(
            f"{split_dir} holds no images ({', '.join(IMG_EXTENSIONS)}); set dataset.root to the folder that has them."
        )
    return SplitFiles(root, tuple(paths), tuple(targets))


def _tiny_split(cfg: dict, spec: DatasetSpec, split: str) -> SplitFiles:
    root = _existing_dir(cfg, data_root(cfg))
    assert spec.wnids is not None, "a tiny_imagenet spec lists its wnids"
    label_of = {w: i for i, w in enumerate(spec.wnids)}
    paths, targets = [], []
    if split == "train":
        for wnid, label in label_of.items():
            files = _images_under(root, _existing_dir(cfg, root / "train" / wnid / "images"))
            paths.extend(files)
            targets.extend([label] * len(files))
        return SplitFiles(root, tuple(paths), tuple(targets))
    # The official test images carry no labels, so "test" is the labelled val split.
    annotations = root / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise missing_data(cfg, annotations)
    for line in _read_lines(annotations):
        filename, wnid = line.split("\t")[:2]
        if wnid not in label_of:
            raise ConfigError(
                f"{annotations} labels {filename} with {wnid!r}, which is not in "
                f"{root / 'wnids.txt'}; set dataset.root to an unmodified tiny-imagenet-200."
            )
        paths.append(f"val/images/{filename}")
        targets.append(label_of[wnid])
    return SplitFiles(root, tuple(paths), tuple(targets))


def list_split(cfg: dict, spec: DatasetSpec, split: str) -> SplitFiles:
    """The files and labels of `split` ("train" | "test") for a file-based format."""
    if cfg["format"] == "tiny_imagenet":
        return _tiny_split(cfg, spec, split)
    return _folder_split(cfg, spec, split)


def _keep_subset(cfg: dict, classes, wnids, num_classes: int):
    """The first `dataset.subset.classes` labels, or all of them."""
    keep, _ = subset_size(cfg)
    if keep is None:
        return classes, wnids, num_classes
    if keep > num_classes:
        raise ConfigError(
            f"dataset.subset.classes={keep} but dataset {cfg.get('name')!r} has {num_classes} classes; "
            f"set dataset.subset.classes <= {num_classes}."
        )
    return classes[:keep], None if wnids is None else wnids[:keep], keep


def dataset_spec(cfg_dataset: Mapping[str, Any] | DictConfig) -> DatasetSpec:
    """Build the DatasetSpec of a `dataset` config node (DictConfig or dict)."""
    cfg = as_dict(cfg_dataset)
    classes, wnids = cfg.get("classes"), cfg.get("wnids")
    if classes is None:
        classes, wnids = discover_classes(cfg)
    if wnids is not None and len(wnids) != len(classes):
        raise ConfigError(
            f"dataset.wnids has {len(wnids)} entries but dataset.classes has {len(classes)}; "
            "they must list the same classes in label order."
        )
    num_classes = cfg.get("num_classes")
    if num_classes is None:
        num_classes = len(classes)
    if num_classes != len(classes):
        raise ConfigError(
            f"dataset.num_classes is {num_classes} but dataset {cfg.get('name')!r} has "
            f"{len(classes)} classes; set dataset.num_classes={len(classes)} "
            "(or point dataset.root at the intended data)."
        )
    classes, wnids, num_classes = _keep_subset(cfg, classes, wnids, num_classes)
    channels = int(cfg["channels"])
    return DatasetSpec(
        name=str(cfg["name"]),
        classes=tuple(str(c) for c in classes),
        wnids=None if wnids is None else tuple(str(w) for w in wnids),
        channels=channels,
        resolution=int(cfg["resolution"]),
        mean=per_channel(cfg, "mean", channels),
        std=per_channel(cfg, "std", channels),
        num_classes=int(num_classes),
    )
