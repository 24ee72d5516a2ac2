"""Reading the OpenKBP training / validation splits as Patients (never the test split)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from atp.errors import InputError
from atp.io.openkbp import load_openkbp_npz

SPLITS = ("train", "validation")


def _natural_key(p: Path):
    stem = p.stem
    num = stem.split("_")[-1]
    return (int(num) if num.isdigit() else 10**9, stem)


def split_files(data_dir: str | Path, split: str) -> list[Path]:
    """Sorted ``pt_N.npz`` files of one split (``train`` or ``validation``)."""
    if split not in SPLITS:
        raise InputError(f"split must be one of {SPLITS}", field="split")
    folder = Path(data_dir) / split
    if not folder.is_dir():
        raise InputError(f"no '{split}' folder with OpenKBP .npz patients", file=folder)
    files = sorted(folder.glob("*.npz"), key=_natural_key)
    if not files:
        raise InputError("no .npz patients found", file=folder)
    return files


def iter_split(data_dir: str | Path, split: str, limit: int | None = None) -> Iterator:
    files = split_files(data_dir, split)
    for f in files[:limit] if limit else files:
        yield load_openkbp_npz(f)
