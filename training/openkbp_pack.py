"""Pack / unpack the OpenKBP .npz files small enough to travel to a GPU machine (<= 64 MiB).

    python -m training.openkbp_pack pack   SRC_DIR DST_DIR [--workers N]
    python -m training.openkbp_pack unpack SRC_DIR DST_DIR [--workers N]

``pack`` keeps every key; CT, masks and the possible-dose mask are lossless (byte-shuffled,
LZMA); the dose is rounded to 0.01 Gy (uint16, the only loss: at most 0.005 Gy, three
orders below the scores it trains for). ``unpack`` writes ordinary compressed .npz files
that ``atp.io.openkbp.load_openkbp_npz`` reads. Not shipped: a tool of the training runs.
"""

from __future__ import annotations

import argparse
import lzma
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

DOSE_STEP_GY = 0.01
_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


def _shuffle(a: np.ndarray) -> bytes:
    a = np.ascontiguousarray(a)
    return a.view(np.uint8).reshape(-1, a.dtype.itemsize).T.copy().tobytes()


def _unshuffle(b: bytes, dtype, shape) -> np.ndarray:
    dt = np.dtype(dtype)
    u = np.frombuffer(b, np.uint8).reshape(dt.itemsize, -1).T.copy()
    return u.view(dt).reshape(shape)


def pack_one(src: Path, dst: Path) -> int:
    with np.load(src) as z:
        d = {k: z[k] for k in z.files}
    out = {}
    for k, a in d.items():
        if k == "dose":
            q = np.round(a.astype(np.float64) / DOSE_STEP_GY)
            if q.min() < 0 or q.max() > 65535:
                raise ValueError(f"{src}: dose outside 0..655 Gy")
            a = q.astype(np.uint16)
        if a.dtype.kind in "US":
            out[k] = a
            continue
        out[k + ".lz"] = np.frombuffer(lzma.compress(_shuffle(a), format=lzma.FORMAT_XZ,
                                                     filters=_FILTERS), np.uint8)
        out[k + ".meta"] = np.array([a.dtype.str] + [str(n) for n in a.shape])
    np.savez(dst, **out)
    return dst.stat().st_size


def unpack_one(src: Path, dst: Path) -> int:
    with np.load(src) as z:
        keys = {k[:-3] for k in z.files if k.endswith(".lz")}
        d = {k: z[k] for k in z.files if not k.endswith((".lz", ".meta"))}
        for k in keys:
            meta = [str(x) for x in z[k + ".meta"]]
            a = _unshuffle(lzma.decompress(z[k + ".lz"].tobytes()), meta[0],
                           tuple(int(n) for n in meta[1:]))
            if k == "dose":
                a = (a.astype(np.float64) * DOSE_STEP_GY).astype(np.float32)
            d[k] = a
    np.savez_compressed(dst, **d)
    return dst.stat().st_size


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["pack", "unpack"])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--workers", type=int, default=1)
    a = ap.parse_args(argv)
    src, dst = Path(a.src), Path(a.dst)
    dst.mkdir(parents=True, exist_ok=True)
    files = sorted(src.glob("*.npz"))
    if not files:
        print(f"{src}: no .npz files", file=sys.stderr)
        return 2
    fn = pack_one if a.action == "pack" else unpack_one
    with ProcessPoolExecutor(a.workers) as ex:
        sizes = list(ex.map(fn, files, [dst / f.name for f in files]))
    print(f"{a.action}: {len(files)} files, {sum(sizes) / 1e6:.1f} MB -> {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
