"""ddist.data: specs, every on-disk layout, label order, caching and user-facing errors.

Fixture images are solid colours whose red channel encodes the expected label
(`_colour`), so a wrong label order shows up as label != decoded colour.
"""

import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ddist.data import DatasetSpec, class_indices, dataset_spec, load_split, loaders
from ddist.data.augment import sample_params
from ddist.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf" / "dataset"
DATASETS = [
    "digits",
    "cifar10",
    "cifar100",
    "tiny_imagenet",
    "imagenet1k",
    "imagenette",
    "imagewoof",
    "folder",
]
SCHEMA_KEYS = {
    "name",
    "format",
    "root",
    "download",
    "num_classes",
    "classes",
    "wnids",
    "channels",
    "resolution",
    "mean",
    "std",
    "in_memory",
    "subset",
    "augment",
    "protocol",
}
AUGMENT_KEYS = {"crop_scale", "flip", "crop_draw", "roll", "roll_mode"}
# SRe2L's recover per dataset (VILA-Lab/SRe2L): (crop_scale, flip, crop_draw, jitter, its offsets), from
# recover_cifar.py (CIFAR-100; CIFAR-10 assumed alike), recover_tiny.py and recover/data_synthesis.py
SRE2L_RECOVER = {
    "cifar10": (None, False, "per_batch", 4, "sre2l"),  # randint(0, 4), no crop or flip
    "cifar100": (None, False, "per_batch", 4, "sre2l"),
    "tiny_imagenet": ([0.08, 1.0], True, "per_batch", 4, "symmetric"),  # randint(-4, 4) after crop + flip
    "imagenet1k": ([0.08, 1.0], True, "per_batch", 32, "sre2l"),  # randint(0, 32) after crop + flip
}
# hard_epochs: conf/evaluate/hard.yaml interpolates it ({max_ipc: epochs, ..., max: epochs}).
PROTOCOL_KEYS = {
    "teacher_epochs",
    "teacher_lr",
    "student_epochs",
    "temperature",
    "batch_size",
    "hard_epochs",
    "recover_iterations",
    "recover_lr",
    "r_bn",
    "deda_reg_iterations",
}


def _colour(label: int) -> tuple[int, int, int]:
    return (10 + 20 * label, 200 - 15 * label, 90)


def _label_of(image_uint8: torch.Tensor) -> int:
    """Inverse of _colour from the red channel mean (robust to JPEG and resizing)."""
    return round((image_uint8[0].float().mean().item() - 10) / 20)


def _write(path: Path, label: int, size=(12, 12)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, _colour(label)).save(path)


def _cfg(name: str, **overrides):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    return OmegaConf.merge(cfg, overrides)


def _assert_labels_match_colours(ds) -> None:
    decoded = [_label_of(ds.images[i]) for i in range(len(ds))]
    assert decoded == ds.targets.tolist()


# --------------------------------------------------------------------- configs


@pytest.mark.parametrize("name", DATASETS)
def test_dataset_yaml_has_schema(name):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    assert set(cfg.keys()) >= SCHEMA_KEYS
    assert cfg.name == name
    assert set(cfg.augment.keys()) == {"student", "recover"}
    for part in ("student", "recover"):
        assert set(cfg.augment[part].keys()) == AUGMENT_KEYS
    assert set(cfg.protocol.keys()) == PROTOCOL_KEYS
    assert "max" in cfg.protocol.hard_epochs
    assert len(cfg.mean) == len(cfg.std) == cfg.channels
    if cfg.classes is not None:
        assert len(cfg.classes) == cfg.num_classes
        assert len(set(cfg.classes)) == cfg.num_classes
    if cfg.wnids is not None:
        assert len(cfg.wnids) == cfg.num_classes


@pytest.mark.parametrize("name", sorted(SRE2L_RECOVER))
def test_recover_augmentation_is_sre2ls(name):
    aug = OmegaConf.load(CONF / f"{name}.yaml").augment
    rec = aug.recover
    crop = None if rec.crop_scale is None else list(rec.crop_scale)
    assert (crop, rec.flip, rec.crop_draw, rec.roll, rec.roll_mode) == SRE2L_RECOVER[name]
    assert aug.student.crop_draw == "per_image"


def test_tiny_imagenet_jitter_is_two_sided():
    # recover_tiny.py: off = random.randint(-jitter, jitter), jitter 4, both ends included
    aug = OmegaConf.to_container(OmegaConf.load(CONF / "tiny_imagenet.yaml").augment.recover)
    gen = torch.Generator().manual_seed(0)
    offsets = torch.stack([sample_params(2, aug, 64, gen)["roll"] for _ in range(300)])
    assert set(offsets.flatten().tolist()) == set(range(-4, 5))


def test_every_dataset_has_a_config():
    assert sorted(p.stem for p in CONF.glob("*.yaml")) == sorted(DATASETS)


def test_cifar_class_lists_are_official_order():
    cifar10 = OmegaConf.load(CONF / "cifar10.yaml").classes
    assert list(cifar10) == [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    cifar100 = list(OmegaConf.load(CONF / "cifar100.yaml").classes)
    # The official fine-label order is alphabetical.
    assert cifar100 == sorted(cifar100) and cifar100[:3] == ["apple", "aquarium_fish", "baby"]


@pytest.mark.parametrize(
    "name,first,ids",
    [
        ("imagenette", "n01440764", [0, 217, 482, 491, 497, 566, 569, 571, 574, 701]),
        ("imagewoof", "n02096294", [193, 182, 258, 162, 155, 167, 159, 273, 207, 229]),
    ],
)
def test_subset_configs_carry_imagenet_ids(name, first, ids):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    assert cfg.wnids[0] == first
    assert list(cfg.imagenet_ids) == ids


# ------------------------------------------------------------------------ spec


def test_spec_normalize_roundtrip_and_values():
    spec = dataset_spec(_cfg("cifar10", root="unused"))
    x = torch.rand(2, 3, 4, 4)
    y = spec.normalize(x)
    assert torch.allclose(y[0, 0], (x[0, 0] - 0.4914) / 0.2470)
    assert torch.allclose(y[1, 2], (x[1, 2] - 0.4465) / 0.2616)
    assert torch.allclose(spec.denormalize(y), x, atol=1e-6)


def test_spec_from_plain_dict():
    cfg = OmegaConf.to_container(_cfg("digits"))
    spec = dataset_spec(cfg)
    assert isinstance(spec, DatasetSpec)
    assert spec.classes == tuple(str(i) for i in range(10))
    assert (spec.channels, spec.resolution, spec.num_classes) == (1, 16, 10)
    assert spec.mean == (0.3054,) and spec.wnids is None


def test_num_classes_mismatch_is_a_config_error():
    with pytest.raises(ConfigError, match="dataset.num_classes"):
        dataset_spec(_cfg("digits", num_classes=11))


# ---------------------------------------------------------------------- digits


def test_digits_split_sizes_stratified_deterministic():
    train, test = load_split(_cfg("digits"), "train"), load_split(_cfg("digits"), "test")
    assert (len(train), len(test)) == (1437, 360)
    assert train.images.shape == (1437, 1, 16, 16) and train.images.dtype == torch.uint8
    # Stratified: every class keeps ~20% of its images in the test split.
    total = train.targets.bincount() + test.targets.bincount()
    assert (test.targets.bincount() - 0.2 * total).abs().max() <= 1
    again = load_split(_cfg("digits"), "test")
    assert torch.equal(again.images, test.images) and torch.equal(again.targets, test.targets)
    # The hard-coded mean/std are the train split's statistics.
    x = train.images.float() / 255
    assert abs(x.mean().item() - 0.3054) < 1e-3 and abs(x.std().item() - 0.3186) < 1e-3
    image, label = train[0]
    assert image.dtype == torch.float32 and image.shape == (1, 16, 16)
    assert torch.allclose(image, (train.images[0].float() / 255 - 0.3054) / 0.3186)
    assert label == int(train.targets[0])


def test_class_indices():
    ds = load_split(_cfg("digits"), "test")
    idx = class_indices(ds, 3)
    assert idx.dtype == torch.long and len(idx) == int((ds.targets == 3).sum())
    assert (ds.targets[idx] == 3).all()


# ------------------------------------------------------ cifar folder / torchvision


CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture
def cifar_folder(tmp_path):
    root = tmp_path / "cifar10"
    # Folders are created in reverse so creation order cannot give the right answer.
    for label, name in reversed(list(enumerate(CIFAR10))):
        for i in range(2):
            _write(root / "train" / name / f"{i:04d}.jpg", label, size=(32, 32))
        _write(root / "test" / name / "0000.jpg", label, size=(32, 32))
    return root


def test_cifar_folder_labels_shapes(cifar_folder, tmp_path):
    cfg = _cfg("cifar10", format="folder", root=str(cifar_folder))
    train = load_split(cfg, "train", tmp_path / "cache")
    assert train.images.shape == (20, 3, 32, 32)
    _assert_labels_match_colours(train)
    test = load_split(cfg, "test", tmp_path / "cache")
    assert test.targets.tolist() == list(range(10))
    _assert_labels_match_colours(test)


def test_subset_keeps_the_first_classes_and_images_of_a_folder_and_of_digits(cifar_folder, tmp_path):
    subset = {"classes": 3, "per_class": 1}
    cfg = _cfg("cifar10", format="folder", root=str(cifar_folder), subset=subset)
    assert dataset_spec(cfg).classes == ("airplane", "automobile", "bird")
    train = load_split(cfg, "train", tmp_path / "cache")
    assert train.targets.tolist() == [0, 1, 2]
    _assert_labels_match_colours(train)
    whole = load_split(_cfg("cifar10", format="folder", root=str(cifar_folder)), "train", tmp_path / "cache")
    assert torch.equal(train.images, whole.images[[0, 2, 4]])  # the first image of each class
    digits = load_split(_cfg("digits", subset={"classes": 2, "per_class": None}), "test")
    everything = load_split(_cfg("digits"), "test")
    assert torch.equal(digits.targets, everything.targets[everything.targets < 2])
    with pytest.raises(ConfigError, match="dataset.subset.classes"):
        dataset_spec(_cfg("digits", subset={"classes": 11}))


def test_synthetic_format_stands_in_for_absent_data():
    cfg = _cfg("imagenet1k", format="synthetic", root=None, subset={"classes": 2, "per_class": 3}, resolution=24)
    spec = dataset_spec(cfg)  # the classes of an absent ImageNet are made up, not read from disk
    assert spec.classes == ("class_0", "class_1") and spec.num_classes == 2
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert train.images.shape == (6, 3, 24, 24) and train.targets.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(load_split(cfg, "train").images, train.images)
    assert not torch.equal(train.images, test.images)
    with pytest.raises(ConfigError, match="dataset.subset.per_class"):
        load_split(_cfg("imagenet1k", format="synthetic", root=None), "train")


def test_cifar_folder_must_match_class_list(cifar_folder):
    (cifar_folder / "train" / "truck").rename(cifar_folder / "train" / "lorry")
    with pytest.raises(ConfigError, match="'truck'.*dataset.root"):
        load_split(_cfg("cifar10", format="folder", root=str(cifar_folder)), "train")


def _fake_cifar10_batches(root: Path) -> None:
    """torchvision's CIFAR-10 pickle layout with 2 images per batch; colour encodes label."""
    batches = root / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        labels = [(2 * b) % 10, (2 * b + 1) % 10]
        data = np.stack([np.array(_colour(y), dtype=np.uint8).repeat(32 * 32) for y in labels])
        with open(batches / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
    with open(batches / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR10}, f)


def test_torchvision_cifar10_format(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    _fake_cifar10_batches(tmp_path)
    # The fake files cannot match the official md5 sums.
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    train = load_split(_cfg("cifar10", root=str(tmp_path)), "train")
    assert train.images.shape == (10, 3, 32, 32)
    assert train.targets.tolist() == list(range(10))
    _assert_labels_match_colours(train)
    test = load_split(_cfg("cifar10", root=str(tmp_path), resolution=16), "test")
    assert test.images.shape == (2, 3, 16, 16)
    _assert_labels_match_colours(test)


def test_torchvision_missing_root_without_download(tmp_path):
    with pytest.raises(ConfigError, match="dataset.download=true") as err:
        load_split(_cfg("cifar100", root=str(tmp_path / "nowhere")), "train")
    assert "dataset.root" in str(err.value)


# -------------------------------------------------------------- tiny-imagenet


TINY_WNIDS = ["n03000000", "n01000000", "n02000000"]  # deliberately not sorted


@pytest.fixture
def tiny_root(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    root.mkdir()
    (root / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    (root / "words.txt").write_text(
        "n00000001\tentity\nn01000000\tgoldfish, Carassius auratus\n"
        "n02000000\ttabby, tabby cat\nn03000000\tschool bus\n"
    )
    for label, wnid in enumerate(TINY_WNIDS):
        for i in range(2):
            _write(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", label, size=(64, 64))
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    # Annotation order differs from both file-name order and label order.
    val = [("val_2.JPEG", 1), ("val_0.JPEG", 2), ("val_10.JPEG", 0), ("val_1.JPEG", 1)]
    for filename, label in val:
        _write(root / "val" / "images" / filename, label, size=(64, 64))
    (root / "val" / "val_annotations.txt").write_text("".join(f"{f}\t{TINY_WNIDS[y]}\t0\t0\t63\t63\n" for f, y in val))
    return root, [y for _, y in val]


def test_tiny_imagenet_label_order_and_names(tiny_root, tmp_path):
    root, val_labels = tiny_root
    cfg = _cfg("tiny_imagenet", root=str(root), num_classes=3)
    spec = dataset_spec(cfg)
    assert spec.wnids == tuple(TINY_WNIDS)
    assert spec.classes == ("school bus", "goldfish", "tabby")
    train = load_split(cfg, "train", tmp_path / "cache")
    assert train.images.shape == (6, 3, 64, 64)
    assert train.targets.tolist() == [0, 0, 1, 1, 2, 2]
    _assert_labels_match_colours(train)
    test = load_split(cfg, "test", tmp_path / "cache")
    assert test.targets.tolist() == val_labels
    _assert_labels_match_colours(test)


def test_tiny_imagenet_without_words_uses_wnids(tiny_root):
    root, _ = tiny_root
    (root / "words.txt").unlink()
    assert dataset_spec(_cfg("tiny_imagenet", root=str(root), num_classes=3)).classes == tuple(TINY_WNIDS)


# ------------------------------------------------------------ imagenet folders


def _imagenet_tree(root: Path, wnids, label_of, sizes=((40, 30), (30, 50))) -> None:
    for wnid in wnids:
        for i, size in enumerate(sizes):
            _write(root / "train" / wnid / f"{wnid}_{i}.JPEG", label_of(wnid), size=size)
        _write(root / "val" / wnid / f"ILSVRC2012_val_{wnid}.JPEG", label_of(wnid), size=(50, 40))


def test_imagenet_folder_sorted_wnids_lazy(tmp_path):
    wnids = ["n09000000", "n01000000", "n05000000"]
    ordered = sorted(wnids)
    _imagenet_tree(tmp_path, wnids, ordered.index)
    cfg = _cfg("imagenet1k", root=str(tmp_path), num_classes=3, resolution=24)
    spec = dataset_spec(cfg)
    assert spec.wnids == tuple(ordered) and spec.classes == tuple(ordered)
    train = load_split(cfg, "train")
    assert train.images is None and len(train) == 6
    for i in range(len(train)):
        image, label = train[i]
        assert image.shape == (3, 24, 24)
        raw = spec.denormalize(image) * 255
        assert _label_of(raw) == label == train.targets[i]
    test = load_split(cfg, "test")
    assert test.targets.tolist() == [0, 1, 2]
    assert test[0][0].shape == (3, 24, 24)


def test_imagenet_test_split_is_resized_then_centre_cropped(tmp_path):
    """Test images: shorter side to resolution*256/224, then the centre crop."""
    path = tmp_path / "val" / "n01000000" / "a.png"
    path.parent.mkdir(parents=True)
    # Left and right thirds black, the middle third white.
    image = np.zeros((64, 96, 3), dtype=np.uint8)
    image[:, 32:64] = 255
    Image.fromarray(image).save(path)
    _write(tmp_path / "train" / "n01000000" / "b.png", 0)
    cfg = _cfg("imagenet1k", root=str(tmp_path), num_classes=1, resolution=28, in_memory=True)
    test = load_split(cfg, "test")
    # 64x96 -> shorter side 32 (= 28 * 256/224) -> 32x48, white band at columns
    # 16..31; the 28-wide centre crop starts at column 10, so crop columns 6..21 are
    # white. Resizing straight to 28 would put the band at crop columns 7..20.
    assert test.images.shape == (1, 3, 28, 28)
    assert test.images[0, :, :, 6:22].min() >= 200


@pytest.mark.parametrize("name", ["imagenette", "imagewoof"])
def test_imagenet_subset_label_order_and_extra_wnids(tmp_path, name):
    wnids = list(OmegaConf.load(CONF / f"{name}.yaml").wnids)
    extra = ["n00000001", "n99999999"]
    # Extra wnids get a colour no subset label has; they must not be read at all.
    _imagenet_tree(tmp_path, wnids + extra, lambda w: wnids.index(w) if w in wnids else 11)
    cfg = _cfg(name, root=str(tmp_path), resolution=16, in_memory=True)
    train = load_split(cfg, "train", tmp_path / "cache")
    assert train.images.shape == (20, 3, 16, 16)
    assert train.targets.tolist() == [y for y in range(10) for _ in range(2)]
    _assert_labels_match_colours(train)
    test = load_split(cfg, "test", tmp_path / "cache")
    _assert_labels_match_colours(test)
    assert dataset_spec(cfg).wnids == tuple(wnids)


def test_imagenet_subset_missing_wnid_names_it(tmp_path):
    wnids = list(OmegaConf.load(CONF / "imagewoof.yaml").wnids)
    _imagenet_tree(tmp_path, wnids[:-1], lambda w: 0)
    with pytest.raises(ConfigError, match=f"{wnids[-1]}.*dataset.root"):
        load_split(_cfg("imagewoof", root=str(tmp_path), resolution=16), "train")


# -------------------------------------------------------------- generic folder


def test_generic_folder_sorted_classes_grayscale_normalised(tmp_path):
    for label, name in enumerate(["apple", "Banana", "cherry"]):  # sorted() order: B, a, c
        for i in range(3):
            path = tmp_path / "train" / name / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("L", (20, 10), 40 * label + 10 * i).save(path)
        (tmp_path / "test" / name).mkdir(parents=True)
        Image.new("L", (10, 10), 40 * label).save(tmp_path / "test" / name / "x.png")
    cfg = _cfg("folder", root=str(tmp_path), channels=1, resolution=8, mean=[0.25], std=[0.5])
    spec = dataset_spec(cfg)
    assert spec.classes == ("Banana", "apple", "cherry") and spec.num_classes == 3
    train = load_split(cfg, "train")
    assert train.images.shape == (9, 1, 8, 8)
    # "Banana" (label 0) was written with base grey 40*1.
    assert train.images[0].unique().tolist() == [40]
    assert train.targets.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    image, _ = train[4]
    assert torch.allclose(image, (torch.full((1, 8, 8), 10 / 255) - 0.25) / 0.5)
    assert load_split(cfg, "test").targets.tolist() == [0, 1, 2]


def test_folder_with_unlisted_class_is_a_config_error(cifar_folder):
    _write(cifar_folder / "train" / "zebra" / "0.jpg", 0)
    with pytest.raises(ConfigError, match="zebra"):
        load_split(_cfg("cifar10", format="folder", root=str(cifar_folder)), "train")


# ----------------------------------------------------------------------- cache


def test_decoded_split_is_cached_and_invalidated(cifar_folder, tmp_path, monkeypatch):
    cfg = _cfg("cifar10", format="folder", root=str(cifar_folder))
    cache = tmp_path / "cache"
    first = load_split(cfg, "train", cache)
    files = list((cache / "datasets").glob("*/images.safetensors"))  # a store entry (ddist/runtime/store.py)
    assert len(files) == 1 and (files[0].parent / "key.json").is_file() and (files[0].parent / "done.json").is_file()
    assert not files[0].stat().st_mode & 0o222  # read-only once complete

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the cache holds this split")

    monkeypatch.setattr(loaders, "decode_all", no_decoding)
    second = load_split(cfg, "train", cache)
    assert torch.equal(first.images, second.images)
    assert torch.equal(first.targets, second.targets)
    # Another resolution, or a changed file, is a different cache entry.
    monkeypatch.undo()
    load_split(_cfg("cifar10", format="folder", root=str(cifar_folder), resolution=16), "train", cache)
    _write(cifar_folder / "train" / "cat" / "0002.jpg", 3, size=(32, 32))
    assert len(load_split(cfg, "train", cache)) == 21
    assert len(list((cache / "datasets").glob("*/images.safetensors"))) == 3
    assert not list((cache / "datasets").glob("*/.*tmp"))


@pytest.mark.parametrize("damage", [b"not a safetensors file", None])  # None: the same size, other bytes
def test_corrupt_cache_entry_is_rebuilt_with_a_warning_naming_it(cifar_folder, tmp_path, caplog, damage):
    cfg = _cfg("cifar10", format="folder", root=str(cifar_folder))
    first = load_split(cfg, "test", tmp_path).images.clone()  # a cache hit maps the file: copy before damaging it
    (entry,) = (tmp_path / "datasets").glob("*/images.safetensors")
    entry.chmod(0o644)  # read-only once written; root writes anyway
    entry.write_bytes(damage if damage is not None else b"x" * entry.stat().st_size)
    with caplog.at_level(logging.WARNING, logger="ddist"):
        assert torch.equal(load_split(cfg, "test", tmp_path).images, first)
    assert f"The cached datasets at {entry.parent}" in caplog.text and "building it again" in caplog.text


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("folder", {}),
        ("cifar10", {"format": "folder"}),
        ("tiny_imagenet", {}),
        ("imagenet1k", {}),
        ("imagenette", {}),
    ],
)
def test_missing_root_says_what_to_set(tmp_path, name, overrides):
    root = None if name == "folder" else str(tmp_path / "absent")
    with pytest.raises(ConfigError, match="dataset.root"):
        load_split(_cfg(name, root=root, **overrides), "train")


def test_missing_root_names_the_download(tmp_path):
    with pytest.raises(ConfigError, match="tiny-imagenet-200.zip"):
        load_split(_cfg("tiny_imagenet", root=str(tmp_path)), "train")


def test_unknown_split(tmp_path):
    with pytest.raises(ConfigError, match="train, test"):
        load_split(_cfg("digits"), "validation")


# ------------------------------------------- dataset=folder: classes known only from disk

# Class folder names a shell, Hydra or argparse could mistake: a space, non-ASCII, a leading dash.
AWKWARD_NAMES = ["a b", "ünï", "-lead"]


def write_class_folders(root: Path, names: list[str], per_class: int = 3) -> None:
    """<root>/{train,test}/<name>/*.png: tiny RGB images, `per_class` per class in train, one in test."""
    for label, name in enumerate(names):
        for split, count in (("train", per_class), ("test", 1)):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.new("RGB", (8, 8), (60 * label, 20 * i, 0)).save(folder / f"{i}.png")


def test_validation_counts_the_class_folders_when_the_config_leaves_them_to_the_data(tmp_path, monkeypatch):
    """dataset=folder has num_classes: null; the up-front checks read the count with dataset_spec (the
    loaders' own function) instead of failing on None (a TypeError in the memory check before)."""
    from conftest import compose_cfg

    from ddist.config import checks
    from ddist.pipeline import validate

    write_class_folders(tmp_path / "data", AWKWARD_NAMES)
    cfg = compose_cfg(
        "dataset=folder",
        f"dataset.root={tmp_path / 'data'}",
        "ipc=2",
        cache_dir=tmp_path / "cache",
        run_dir=tmp_path / "run",
    )
    assert cfg.dataset.num_classes is None
    validate(cfg)
    assert dataset_spec(cfg.dataset).classes == tuple(sorted(AWKWARD_NAMES))
    monkeypatch.setattr(checks, "_available_memory", lambda: 1024)
    with pytest.raises(ConfigError, match=r"ipc=2 makes a set of .* \(3 classes x 3x32x32 float32\)"):
        validate(cfg)
    cfg.dataset.root = str(tmp_path / "absent")  # a missing root keeps its message
    with pytest.raises(ConfigError, match="absent/train does not exist"):
        validate(cfg)


def test_val_per_class_too_large_names_the_smallest_class():
    """Class 1 is the first short class, class 2 the smallest: the message names 2 and its size, as ipc's does."""
    targets = torch.tensor([0] * 5 + [1] * 3 + [2] * 2)
    with pytest.raises(ConfigError) as err:
        loaders.val_indices(targets, 3, 3)
    assert str(err.value) == (
        "dataset.val_per_class=3 leaves class 2 no training images: the smallest class has 2 "
        "(2 class(es) have 3 or fewer); set dataset.val_per_class below 2."
    )


@pytest.mark.parametrize(
    ("subset", "message"),
    [
        (5, "dataset.subset=5 is not a subset: give dataset.subset={classes: K, per_class: N}"),
        ({"foo": 1}, "dataset.subset={'classes': None, 'per_class': None, 'foo': 1} is not a subset"),
        ({"classes": 0}, "dataset.subset.classes=0 must be an integer >= 1, or null"),
        ({"per_class": "3"}, "dataset.subset.per_class='3' must be an integer >= 1, or null"),
    ],
)
def test_a_bad_subset_names_the_option(subset, message):
    with pytest.raises(ConfigError) as err:
        dataset_spec(_cfg("digits", subset=subset))
    assert str(err.value).startswith(message)
