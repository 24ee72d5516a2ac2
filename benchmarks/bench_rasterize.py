"""Contour rasterisation and DICOM import speed on a clinical-size CT grid.

    nice -n 10 .venv/bin/python benchmarks/bench_rasterize.py [--slices 128] [--size 512]

1. Rasterise a head-and-neck-like structure set (body outline, 2 parotids, cord, a
   ring-shaped target with a hole) on --compare-slices slices of size x size,
   with atp's scanline even-odd fill, and the same contours with matplotlib's
   ``Path.contains_points`` restricted to each polygon's bounding box (XOR-combined),
   side by side; the masks must agree exactly.
2. Write a synthetic CT series of slices x size x size plus an RTSTRUCT (pydicom) to a temporary
   folder and time ``atp.io.dicom.load_dicom`` end to end.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _circle(cr, cc, ar, ac, n):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.c_[cr + ar * np.sin(t), cc + ac * np.cos(t)]


def structure_set(size: int) -> dict[str, list[np.ndarray]]:
    """Per structure, the in-plane polygons (row, col) of one slice."""
    s = size / 512.0
    return {
        "External": [_circle(256 * s, 256 * s, 190 * s, 170 * s, 1500)],
        "Parotid_L": [_circle(230 * s, 360 * s, 30 * s, 22 * s, 300)],
        "Parotid_R": [_circle(230 * s, 152 * s, 30 * s, 22 * s, 300)],
        "SpinalCord": [_circle(330 * s, 256 * s, 8 * s, 8 * s, 80)],
        "PTV_70": [_circle(220 * s, 256 * s, 70 * s, 60 * s, 600),
                   _circle(225 * s, 256 * s, 25 * s, 20 * s, 200)],
    }


def raster_atp(polys, shape):
    from atp.io.rasterize import rasterize_slice

    return rasterize_slice(polys, shape)


def raster_matplotlib(polys, shape):
    from matplotlib.path import Path as MPath

    out = np.zeros(shape, dtype=bool)
    for poly in polys:
        r0, c0 = np.maximum(np.floor(poly.min(axis=0)).astype(int), 0)
        r1, c1 = np.minimum(np.ceil(poly.max(axis=0)).astype(int) + 1, shape)
        rr, cc = np.mgrid[r0:r1, c0:c1]
        inside = MPath(poly).contains_points(np.c_[rr.ravel(), cc.ravel()])
        out[r0:r1, c0:c1] ^= inside.reshape(rr.shape)
    return out


def bench_raster(n_slices: int, size: int) -> None:
    sset = structure_set(size)
    shape = (size, size)
    n_points = sum(len(p) for polys in sset.values() for p in polys)
    times = {}
    masks = {}
    for name, fn in (("atp scanline", raster_atp), ("matplotlib bbox", raster_matplotlib)):
        t0 = time.perf_counter()
        per = {}
        for _ in range(n_slices):
            for roi, polys in sset.items():
                per[roi] = fn(polys, shape)
        times[name] = time.perf_counter() - t0
        masks[name] = per
    for roi in sset:
        assert np.array_equal(masks["atp scanline"][roi], masks["matplotlib bbox"][roi]), roi
    print(f"rasterise {len(sset)} structures ({n_points} contour points per slice) on "
          f"{n_slices}x{size}x{size}:")
    for name, t in times.items():
        print(f"  {name:16s} {t:7.3f} s  ({1e3 * t / n_slices:.2f} ms/slice)")
    print(f"  ratio matplotlib/atp: {times['matplotlib bbox'] / times['atp scanline']:.1f}x "
          "(masks identical)")


def bench_load(n_slices: int, size: int) -> None:
    from dicom_fixtures import write_ct_series, write_rtstruct

    from atp.io.dicom import load_dicom

    with tempfile.TemporaryDirectory() as tmp:
        ct = write_ct_series(Path(tmp), shape=(n_slices, size, size),
                             spacing_mm=(2.5, 0.98, 0.98), angle_deg=0.0)
        rois = []
        for roi, polys in structure_set(size).items():
            contours = [np.array([ct.index_to_patient(k, r, c) for r, c in poly])
                        for k in range(n_slices) for poly in polys]
            rois.append((roi, contours))
        write_rtstruct(Path(tmp) / "RS.dcm", ct, rois)
        t0 = time.perf_counter()
        p = load_dicom(tmp, fractions=35)
        dt = time.perf_counter() - t0
    print(f"load_dicom: CT {p.grid.shape} + RTSTRUCT with {len(rois)} ROIs "
          f"({n_slices} slices each): {dt:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=128)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--compare-slices", type=int, default=16,
                    help="slices for the side-by-side comparison (matplotlib is slow)")
    ap.add_argument("--skip-load", action="store_true")
    args = ap.parse_args()
    bench_raster(min(args.compare_slices, args.slices), args.size)
    if not args.skip_load:
        bench_load(args.slices, args.size)


if __name__ == "__main__":
    main()
