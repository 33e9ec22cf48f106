"""Published accuracies beside ours: conf/published.yaml (its header gives the schema).

A report row gets the published figure whose dataset, method, IPC and student match its own
(protocol is recorded, not matched: the papers' protocols are described in each entry's note)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ddist import CONF_DIR

PUBLISHED = CONF_DIR / "published.yaml"
FIELDS = ("dataset", "method", "ipc", "student", "top1", "paper", "table", "protocol")


def load_published(path: Path = PUBLISHED) -> list[dict[str, Any]]:
    """The entries of a published-results file, each with its key (e.g. "sre2l/imagenet1k_ipc10");
    none when the file does not exist. A key holds one entry or a list of them (one per student)."""
    if not path.is_file():
        return []
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of keys such as sre2l/imagenet1k_ipc10 to entries")
    entries = []
    for name, value in data.items():
        key = str(name)
        for entry in value if isinstance(value, list) else [value]:
            missing = [f for f in FIELDS if not isinstance(entry, dict) or f not in entry]
            if missing:
                raise ValueError(f"{path}: entry {key} has no {', '.join(missing)}")
            entries.append({"key": key, **entry})
    return entries


def _match_key(dataset: Any, method: Any, ipc: Any, student: Any) -> tuple[str, str, str, str]:
    return (str(dataset), str(method), str(ipc), str(student))


def add_published(rows: list[dict], entries: list[dict[str, Any]]) -> None:
    """Set each row's "published" (top-1 as a fraction, like acc_mean) and "published_source" (the
    paper, its table and the file's key) from the entry of the same dataset, method, IPC and student;
    None where no entry matches. Rows scored on the validation split get none."""
    by_key = {_match_key(e["dataset"], e["method"], e["ipc"], e["student"]): e for e in entries}
    for row in rows:
        entry = by_key.get(_match_key(row["dataset"], row["method"], row["ipc"], row["student"]))
        if entry is None or row.get("split") == "val":
            row["published"], row["published_source"] = None, None
            continue
        row["published"] = float(entry["top1"]) / 100
        row["published_source"] = f"{entry['paper']}, {entry['table']} ({entry['key']}, {entry['protocol']})"
