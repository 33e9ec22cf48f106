"""Artifacts on disk: atomic writes, checkpoints and the DistilledSet (the cache that keeps
them is ddist/runtime/store.py).

Every file is written to a temporary name in the same directory and renamed
into place, so a killed run leaves either the old file or the new one; a write that fails
(a full disk) is a WriteError naming the file, and leaves nothing partial behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ddist.errors import CheckpointError, WriteError
from ddist.utils import safe_name

# ----------------------------------------------------------------------------- plain values


def to_plain(obj: Any) -> Any:
    """A resolved, JSON-ready copy of a config node (or anything already plain)."""
    if isinstance(obj, (DictConfig, ListConfig)):
        return OmegaConf.to_container(obj, resolve=True, enum_to_str=True)
    return obj


def strict_json(obj: Any) -> str:
    """JSON that every parser reads: a NaN or infinite number becomes null, and a top-level
    "notes" list says which key held what (json.dumps would write bare NaN / Infinity)."""
    notes: list[str] = []

    def clean(x: Any, where: str) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            notes.append(f"{where}: {x} (undefined here), written as null")
            return None
        if isinstance(x, dict):
            return {k: clean(v, f"{where}.{k}" if where else str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v, f"{where}[{i}]") for i, v in enumerate(x)]
        return x

    out = clean(to_plain(obj), "")
    if notes and isinstance(out, dict):
        out["notes"] = [*out.get("notes", []), *notes]
    return json.dumps(out, indent=2, allow_nan=False, default=str)


# ----------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; caches and results are shared like any output
    try:
        with _write_errors(path):
            yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# errno of a write that failed for want of room or a working disk (not of a bad argument)
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}


@contextlib.contextmanager
def _write_errors(path: Path) -> Iterator[None]:
    """A write into the temporary file that fails for want of room (OSError ENOSPC & co., or torch's
    and safetensors' wrappers of it) becomes a WriteError naming `path`; the caller removes the
    temporary file, so nothing partial is left."""
    try:
        yield
    except OSError as err:
        if err.errno not in _WRITE_ERRNOS:
            raise
        raise _write_error(path, err) from None
    except (RuntimeError, SafetensorError) as err:
        text = str(err)
        if not any(s in text for s in ("write", "No space", "IoError", "StorageFull", "Quota")):
            raise
        raise _write_error(path, err) from None


def _write_error(path: Path, err: BaseException) -> WriteError:
    return WriteError(
        f"Could not write {path} ({type(err).__name__}: {str(err)[:200]}); nothing partial was left "
        f"(the temporary file was removed). Free space on the disk of {path.parent}, or write elsewhere "
        "(paths.cache_dir, hydra.run.dir), and rerun."
    )


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_save_tensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None
) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def load_tensors(
    path: str | os.PathLike,
    what: str = "artifact",
    fix: str = "Delete it (a cache entry is rebuilt on the next run) or point the option at a valid file.",
) -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning a missing or corrupt file into a CheckpointError that says `fix`."""
    try:
        return load_file(str(path))
    except (FileNotFoundError, SafetensorError, OSError) as err:
        raise CheckpointError(f"Cannot read the {what} at {path}: {err}. {fix}") from None


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `path` (the old one is removed last).

    The finished directory and everything in it are world-readable (mkdtemp makes 0700 and
    some writers 0600): sets and caches are shared like any output.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        with _write_errors(path):
            yield tmp
        _share(tmp)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _share(root: Path) -> None:
    """chmod a+rX over a tree: directories 0755, files readable by all (a file's write bits stay as they
    are: a hard link to a read-only cache file stays read-only, for every name of it)."""
    os.chmod(root, 0o755)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o755)
        for name in filenames:
            path = os.path.join(dirpath, name)
            os.chmod(path, (os.stat(path).st_mode & 0o777) | 0o444)


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, extra: dict | None = None) -> None:
    """A state dict plus JSON-able metadata, loadable with weights_only=True."""
    payload = {"state_dict": model.state_dict(), "extra": extra or {}}
    with atomic_path(path) as tmp:
        torch_save(payload, tmp)


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save so that the same object gives the same bytes. torch names the archive's folder after
    the file it writes, which at `path` is atomic_path's random temporary name: every save of one
    teacher hashed differently, and the students keyed on its file's hash were not found again from a
    fresh cache. So torch writes a fixed name in a private directory beside `path`, moved into place.
    (Not through a Python file object: torch's writer then calls back into Python for every block, and
    a Ctrl-C landing in such a call killed the process by SIGINT instead of raising KeyboardInterrupt.)"""
    path = Path(path)
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        torch.save(obj, scratch / "checkpoint.pt")
        os.replace(scratch / "checkpoint.pt", path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def load_checkpoint(path: str | os.PathLike, option: str) -> dict:
    """Load a checkpoint saved by save_checkpoint (or a bare state dict) with weights_only=True.

    `option` names the config key that pointed here, so the error says what to fix.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No checkpoint at {path}. Set {option} to an existing file, or to null to train one.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"Cannot read the checkpoint {path} ({type(err).__name__}: {str(err)[:200]}). "
            f"Set {option} to a valid state-dict file, or to null to train one."
        ) from None
    if isinstance(payload, dict) and "state_dict" in payload:
        return payload
    if isinstance(payload, dict) and all(isinstance(v, torch.Tensor) for v in payload.values()):
        return {"state_dict": payload, "extra": {}}
    raise CheckpointError(
        f"{path} holds no state dict. Set {option} to a file saved by ddist or torch.save(model.state_dict())."
    )


def load_model_state(model: torch.nn.Module, payload: dict, path: str | os.PathLike, option: str) -> None:
    """Load a state dict into `model`, naming the option when the architecture does not match."""
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        first = str(err).splitlines()[:3]
        raise CheckpointError(
            f"The checkpoint {path} does not fit the configured model ({' '.join(first)[:300]}). "
            f"Set {option} to a checkpoint of this architecture and dataset, or change the model."
        ) from None


# ----------------------------------------------------------------------------- DistilledSet


@dataclass
class DistilledSet:
    """Images in normalised space [N, C, H, W], their labels [N], and meta.json's content."""

    images: torch.Tensor
    labels: torch.Tensor
    meta: dict

    @property
    def ipc(self) -> int:
        return int(self.meta["ipc"])


def code_version() -> str:
    """The git commit of the code that made an artifact, when it runs from a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
            check=False,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def tensor_checksum(*tensors: torch.Tensor) -> str:
    """SHA-256 of the tensors' bytes (in order): meta.json records it, loading verifies it."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def save_distilled(path: str | os.PathLike, images: torch.Tensor, labels: torch.Tensor, spec, meta: dict) -> Path:
    """Write a DistilledSet directory atomically from tensors in memory (see write_distilled)."""
    images = images.detach().float().cpu()
    chunks = (images[s : s + 1024] for s in range(0, len(images), 1024))
    return write_distilled(path, chunks, labels, tuple(images.shape[1:]), spec, meta)


def write_distilled(
    path: str | os.PathLike,
    chunks: Iterable[torch.Tensor],
    labels: torch.Tensor,
    image_shape: tuple[int, ...],
    spec,
    meta: dict,
) -> Path:
    """Write a DistilledSet directory atomically, streaming its images chunk by chunk.

    `chunks` yields the images (normalised space) in the order of `labels`, so no more than one
    chunk is ever in memory. images/<class>/<i>.png are viewable (and ImageFolder-compatible: file
    names are zero-padded, so their sorted order is the order in data.safetensors),
    data.safetensors keeps the exact float tensors (byte for byte what safetensors' save_file
    writes), meta.json says what made them and their checksum.
    """
    labels = labels.detach().long().cpu().contiguous()
    path = Path(path)
    width = len(str(max(int(labels.bincount().max()) - 1, 0))) if len(labels) else 1
    digest = hashlib.sha256()  # tensor_checksum(images, labels), one chunk at a time
    counters: dict[int, int] = {}
    with atomic_dir(path) as tmp, open(tmp / "data.safetensors", "wb") as out:
        out.write(_safetensors_header(len(labels), image_shape))
        out.write(labels.numpy().tobytes())
        written = 0
        for chunk in chunks:
            chunk = chunk.detach().float().cpu().contiguous()
            data = chunk.numpy().tobytes()
            out.write(data)
            digest.update(data)
            pixels = spec.denormalize(chunk).clamp(0, 1).mul(255).round().to(torch.uint8)
            for img, label in zip(pixels, labels[written : written + len(chunk)].tolist(), strict=True):
                i = counters.get(label, 0)
                counters[label] = i + 1
                class_dir = tmp / "images" / f"{label:04d}_{safe_name(spec.classes[label])}"
                class_dir.mkdir(parents=True, exist_ok=True)
                array = img.permute(1, 2, 0).squeeze(-1).numpy()  # [H, W] for one channel: a greyscale PNG
                Image.fromarray(array).save(class_dir / f"{i:0{width}d}.png")
            written += len(chunk)
        if written != len(labels):
            raise ValueError(f"write_distilled got {written} images for {len(labels)} labels")
        digest.update(labels.numpy().tobytes())
        out.close()
        meta = {
            **meta,
            "num_images": len(labels),
            "classes": list(spec.classes),
            "mean": list(spec.mean),
            "std": list(spec.std),
            "code_version": code_version(),
            "sha256": digest.hexdigest(),
        }
        (tmp / "meta.json").write_text(json.dumps(to_plain(meta), indent=2, default=str))
    return path


def _safetensors_header(n: int, image_shape: tuple[int, ...]) -> bytes:
    """The safetensors header of {"images": float32 [n, *image_shape], "labels": int64 [n]}, as
    save_file lays it out: labels first (the larger alignment), the JSON padded with spaces to 8 bytes."""
    label_bytes, image_bytes = 8 * n, 4 * n * math.prod(image_shape)
    header = {
        "labels": {"dtype": "I64", "shape": [n], "data_offsets": [0, label_bytes]},
        "images": {
            "dtype": "F32",
            "shape": [n, *image_shape],
            "data_offsets": [label_bytes, label_bytes + image_bytes],
        },
    }
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class TensorRows:
    """Rows of a tensor in a safetensors file, read on demand (no memory map: only the rows asked
    for are ever in memory, whatever the file's size)."""

    DTYPES = {"F32": torch.float32, "I64": torch.int64, "U8": torch.uint8}  # noqa: RUF012

    def __init__(self, path: str | os.PathLike, name: str):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            info = json.loads(f.read(size))[name]
        self.dtype = self.DTYPES[info["dtype"]]
        self.shape = tuple(info["shape"])
        self.row_bytes = torch.tensor([], dtype=self.dtype).element_size() * math.prod(self.shape[1:])
        self.offset = 8 + size + info["data_offsets"][0]

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, start: int, stop: int) -> torch.Tensor:
        with open(self.path, "rb") as f:
            f.seek(self.offset + start * self.row_bytes)
            data = bytearray(f.read((stop - start) * self.row_bytes))
        return torch.frombuffer(data, dtype=self.dtype).reshape(stop - start, *self.shape[1:])


def load_distilled(path: str | os.PathLike, spec=None, option: str = "evaluate.distilled") -> DistilledSet:
    """Read a DistilledSet and check it: its checksum, meta.json against the tensors, and (given
    the run's dataset `spec`) image shape and label range. `option` names what to change."""
    path = Path(path)
    redo = (
        f"Recreate the set (rerun the pipeline that made it) or set {option} to an intact DistilledSet "
        "directory (images/, data.safetensors, meta.json)."
    )
    made_in = _cache_entry_of(path)
    if made_in:  # a run directory's copy: hard links to the cache entry's (read-only) files
        redo = (
            f"This set is a copy of the cache entry {made_in} (hard links to its files). Rerun the command "
            f"that made it (the damaged entry is found and rebuilt, with a warning), or delete {made_in}; "
            f"or set {option} to an intact DistilledSet directory."
        )
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"{path} is not a DistilledSet (no meta.json). {redo}")
    tensors = load_tensors(path / "data.safetensors", what="DistilledSet tensors", fix=redo)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}/meta.json is corrupt ({err}). {redo}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(
            f"{path}/meta.json holds a JSON {type(meta).__name__}, not an object of the set's metadata. {redo}"
        )
    if "images" not in tensors or "labels" not in tensors:
        raise CheckpointError(f"{path}/data.safetensors lacks 'images' or 'labels'. {redo}")
    images, labels = tensors["images"], tensors["labels"]
    problem = _distilled_problem(images, labels, meta, spec)
    if problem:
        raise CheckpointError(f"The DistilledSet at {path} {problem}. {redo}")
    return DistilledSet(images, labels, meta)


def _cache_entry_of(path: Path) -> str | None:
    """The cache entry a set was assembled in (meta.json's cache_entry), if meta.json says."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    made_in = meta.get("cache_entry") if isinstance(meta, dict) else None
    return str(made_in) if made_in and Path(made_in).resolve() != path.resolve() else None


def distilled_checksum(path: str | os.PathLike, chunk: int = 1024) -> str:
    """tensor_checksum(images, labels) of a DistilledSet's data.safetensors, read chunk by chunk
    (only `chunk` images in memory at once)."""
    path = Path(path) / "data.safetensors"
    try:
        images, labels = TensorRows(path, "images"), TensorRows(path, "labels")
        digest = hashlib.sha256()
        for start in range(0, len(images), chunk):
            digest.update(images.read(start, min(start + chunk, len(images))).numpy().tobytes())
        digest.update(labels.read(0, len(labels)).numpy().tobytes())
    except (OSError, ValueError, KeyError, RuntimeError, struct.error) as err:
        raise CheckpointError(f"Cannot read {path}: {type(err).__name__}: {str(err)[:200]}") from None
    return digest.hexdigest()


def _distilled_problem(images: torch.Tensor, labels: torch.Tensor, meta: dict, spec) -> str | None:
    """What is wrong with a set's tensors and metadata (None if nothing)."""
    if images.ndim != 4 or labels.ndim != 1 or len(images) != len(labels):
        return f"has images {tuple(images.shape)} and labels {tuple(labels.shape)}, not [N, C, H, W] and [N]"
    if len(labels) == 0:
        return "has no images (N=0): there is nothing to train a student on"
    if images.is_floating_point() and not all(torch.isfinite(c).all() for c in images.split(1024)):
        return "has NaN or infinite pixels (the run that made it diverged, or the file was damaged)"
    if "sha256" in meta and meta["sha256"] != tensor_checksum(images, labels):
        return "has tensors whose checksum differs from meta.json's (the file was changed or damaged)"
    if meta.get("num_images", len(labels)) != len(labels):
        return f"has {len(labels)} images but meta.json says {meta['num_images']}"
    if "ipc" in meta and len(labels) and set(labels.bincount()[labels.unique()].tolist()) != {int(meta["ipc"])}:
        return f"does not have meta.json's ipc={meta['ipc']} images in every class"
    if spec is None:
        return None
    expected = (spec.channels, spec.resolution, spec.resolution)
    if tuple(images.shape[1:]) != expected:
        return (
            f"has images of shape {tuple(images.shape[1:])} but dataset {spec.name} needs {expected} "
            "(channels, resolution, resolution)"
        )
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= spec.num_classes):
        return f"has labels outside 0..{spec.num_classes - 1} of dataset {spec.name}"
    return None


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes: the identity of the teacher that made stored labels."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
