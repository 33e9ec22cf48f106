"""A DistilledSet that does not fit the run is refused with a message naming the option."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file

from ddist.data import dataset_spec
from ddist.errors import CheckpointError
from ddist.runtime.artifacts import load_distilled, save_distilled, tensor_checksum

SPEC = dataset_spec(OmegaConf.load("conf/dataset/digits.yaml"))


def _set(tmp_path, ipc=12):
    labels = torch.arange(3).repeat_interleave(ipc)
    images = SPEC.normalize(torch.rand(len(labels), 1, 16, 16))
    return save_distilled(tmp_path / "set", images, labels, SPEC, {"method": "t", "ipc": ipc, "dataset": "digits"})


def test_file_names_sort_in_tensor_order_and_single_channel_is_greyscale(tmp_path):
    path = _set(tmp_path, ipc=12)
    names = sorted(p.name for p in (path / "images" / "0000_0").iterdir())
    assert names[:3] == ["00.png", "01.png", "02.png"] and names[-1] == "11.png"  # "10" no longer sorts before "2"
    assert Image.open(path / "images" / "0000_0" / "00.png").mode == "L"


def test_a_set_is_world_readable(tmp_path):
    path = _set(tmp_path)
    for p in [path, path / "data.safetensors", path / "meta.json", path / "images"]:
        assert os.stat(p).st_mode & stat.S_IROTH, p


def test_a_changed_tensor_file_fails_its_checksum(tmp_path):
    path = _set(tmp_path)
    good = load_distilled(path, SPEC)
    save_file({"images": good.images * 2, "labels": good.labels}, str(path / "data.safetensors"))
    with pytest.raises(CheckpointError, match="checksum.*evaluate.distilled"):
        load_distilled(path, SPEC)


def _rewrite(path, images, labels, **meta_change):
    """Replace a set's tensors and give meta.json their checksum: damage the checksum cannot see."""
    save_file({"images": images.contiguous(), "labels": labels.contiguous()}, str(path / "data.safetensors"))
    meta = json.loads((path / "meta.json").read_text())
    meta.update(sha256=tensor_checksum(images, labels), **meta_change)
    (path / "meta.json").write_text(json.dumps(meta))


def test_an_empty_set_is_refused_at_load(tmp_path):
    path = _set(tmp_path)
    _rewrite(path, torch.zeros(0, 1, 16, 16), torch.zeros(0, dtype=torch.long), num_images=0)
    with pytest.raises(CheckpointError, match=r"has no images \(N=0\).*evaluate\.distilled"):
        load_distilled(path, SPEC)


def test_nan_pixels_with_a_matching_checksum_are_refused_at_load(tmp_path):
    path = _set(tmp_path)
    good = load_distilled(path, SPEC)
    images = good.images.clone()
    images[5, 0, 3, 3] = float("nan")
    _rewrite(path, images, good.labels)
    with pytest.raises(CheckpointError, match="NaN or infinite pixels.*evaluate\\.distilled"):
        load_distilled(path, SPEC)


@pytest.mark.parametrize("meta", ["[1, 2]", "null", '"text"'])
def test_a_meta_json_that_is_not_an_object_is_refused_at_load(tmp_path, meta):
    path = _set(tmp_path)
    (path / "meta.json").write_text(meta)
    with pytest.raises(CheckpointError, match="meta.json holds a JSON .*, not an object.*evaluate\\.distilled"):
        load_distilled(path, SPEC)


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"num_images": 5}, "meta.json says 5"),
        ({"ipc": 4}, "ipc=4"),
    ],
)
def test_meta_that_disagrees_with_the_tensors(tmp_path, change, needle):
    path = _set(tmp_path)
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, **change}))
    with pytest.raises(CheckpointError, match=needle):
        load_distilled(path, SPEC)


def test_images_or_labels_that_do_not_fit_the_dataset(tmp_path):
    cifar_cfg = OmegaConf.load("conf/dataset/cifar10.yaml")
    cifar_cfg.root = None  # its default interpolates paths.data_dir, absent outside a run
    cifar = dataset_spec(cifar_cfg)
    with pytest.raises(CheckpointError, match=r"shape \(1, 16, 16\).*cifar10"):
        load_distilled(_set(tmp_path), cifar)
    labels = torch.tensor([0, 11])
    path = save_distilled(
        tmp_path / "wide",
        SPEC.normalize(torch.rand(2, 1, 16, 16)),
        labels,
        dataset_spec(
            {
                **OmegaConf.to_container(OmegaConf.load("conf/dataset/digits.yaml")),
                "num_classes": 12,
                "classes": [str(i) for i in range(12)],
            }
        ),
        {"ipc": 1},
    )
    with pytest.raises(CheckpointError, match="labels outside 0..9"):
        load_distilled(path, SPEC)


def test_a_missing_tensor_file_says_to_recreate_the_set_not_to_delete_a_cache(tmp_path):
    path = _set(tmp_path)
    (path / "data.safetensors").unlink()
    with pytest.raises(CheckpointError, match="Recreate the set") as err:
        load_distilled(path, SPEC)
    assert "cache entry" not in str(err.value)


def test_results_are_strict_json_with_a_note_for_each_undefined_number():
    from ddist.runtime.artifacts import strict_json

    text = strict_json({"acc": 0.5, "analysis": {"ssim": float("nan"), "per_class": [1.0, float("inf")]}})
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    assert data["analysis"]["ssim"] is None and data["analysis"]["per_class"] == [1.0, None]
    assert any(n.startswith("analysis.ssim: nan") for n in data["notes"])
    assert any(n.startswith("analysis.per_class[1]: inf") for n in data["notes"])
