"""Collapsed-cone dose of open fields with opentps-core 3.0.1's CCC engine, for
``benchmarks/independent_engine.py``. Runs ONLY in the throw-away opentps environment
(``bash benchmarks/opentps_setup.sh`` makes it); atp never imports opentps:

    /work/venvs/opentps/bin/python benchmarks/opentps_ccc.py CASE.npz OUT.npz [--jobs 1]

CASE.npz (written by independent_engine.py): ``density`` (float32, array axes i, j, k,
relative electron density from atp's HU table), ``spacing_mm`` (3,), and per field:
``source_mm`` (F, 3), ``ip`` / ``jp`` / ``kp`` (F, 3) unit vectors, ``aperture_mm``
(F, 4: centre along ip, centre along jp, width along ip, width along jp at the isocentre
plane), ``sad_mm`` -- all in the array frame (voxel (i, j, k) centre at (i, j, k) *
spacing, mm). OUT.npz: ``dose`` (F, i, j, k) float32, the engine's dose per unit fluence
(no MU calibration), ``seconds`` (F,), ``version``.

Each field is ONE beamlet (the whole jaw opening): split into 5 mm beamlets the engine
masks each beamlet's dose to a cylinder of the beamlet's diagonal + 2 cm (RSAFE in
defs.h), losing the far scatter; for one whole field that cylinder is wider than the
field. Kernels: ``Kernels_6MV`` (the engine's default ``Kernels_differentFluence`` are too
hard for 6 MV). The engine is driven through its file interface (kernel list, geometry
header + density, beam spec written with opentps's own ``writeBeamletInFile``), so the
geometry is exactly the one atp used; opentps's PhotonPlan / CT layer is not used.
"""

from __future__ import annotations

import argparse
import os
import struct
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

KERNEL_FILES = ("radii", "angles", "energies", "primary", "first_scatter", "second_scatter",
                "multiple_scatter", "brem_annih", "total", "fluence", "mu", "mu_en")


def _engine():
    """(engine binary, Kernels_6MV folder, writeBeamletInFile, version) of opentps."""
    # importing opentps writes ~/openTPS_workspace: keep it inside the throw-away venv
    os.environ["HOME"] = str(Path(sys.prefix) / "home")
    Path(os.environ["HOME"]).mkdir(exist_ok=True)
    import importlib.metadata as md

    from opentps.core.io.CCCdoseEngineIO import writeBeamletInFile
    from opentps.core.processing.doseCalculation.photons import cccDoseCalculator

    root = Path(cccDoseCalculator.__file__).parent
    exe = root / "CCC_DoseEngine" / "CCC_DoseEngine"
    kernels = root / "Kernels_6MV"
    if not os.access(exe, os.X_OK) or not (kernels / "kernel_header.txt").is_file():
        sys.exit(f"{exe}: not executable or {kernels}/kernel_header.txt missing; "
                 "run benchmarks/opentps_setup.sh")
    return exe, kernels, writeBeamletInFile, md.version("opentps-core")


def _read_dose(path: Path, shape) -> np.ndarray:
    """The engine's sparse output (one beamlet): int n; then num, M, N, Q, nnz, int
    indices (i + M * (j + N * k)), float values."""
    b = path.read_bytes()
    nb, _num, m, n, q, nnz = struct.unpack("6i", b[:24])
    if nb != 1 or (m, n, q) != tuple(shape):
        raise RuntimeError(f"{path}: unexpected engine output {(nb, m, n, q)}")
    idx = np.frombuffer(b[24:24 + 4 * nnz], np.int32)
    val = np.frombuffer(b[24 + 4 * nnz:24 + 8 * nnz], np.float32)
    flat = np.zeros(m * n * q, np.float32)
    flat[idx] = val
    return flat.reshape((m, n, q), order="F")


def run_field(exe, kernel_list, geometry_list, write_beam, case, f, workdir):
    wd = Path(workdir) / f"field{f}"
    wd.mkdir()
    ap = case["aperture_mm"][f] / 10.0
    with open(wd / "beam.txt", "w") as fh:
        fh.write("beamnum:\n1\n \n")
        # opentps's writer takes i, j, k and writes y_vec = -k * SAD (source for an
        # isocentre at the origin); our isocentre is not at the origin, so y_vec is
        # replaced by the source point below
        write_beam(fh, 0, float(case["sad_mm"]) / 10.0, ap[0], ap[1], ap[2], ap[3],
                   case["ip"][f], case["jp"][f], case["kp"][f])
    lines = (wd / "beam.txt").read_text().splitlines()
    k = lines.index("y_vec")
    lines[k + 1] = " ".join(f"{v:.6f}" for v in case["source_mm"][f] / 10.0)
    for name, key in (("ip", "ip"), ("jp", "jp"), ("kp", "kp")):
        k = lines.index(name)
        lines[k + 1] = " ".join(f"{v:.9f}" for v in case[key][f])
    (wd / "beam.txt").write_text("\n".join(lines) + "\n")
    t = time.perf_counter()
    r = subprocess.run([str(exe), str(kernel_list), str(geometry_list), str(wd / "beam.txt"),
                        str(wd / "dose.bin")], check=False, capture_output=True, text=True,
                       cwd=wd)
    secs = time.perf_counter() - t
    if r.returncode != 1 or "Error" in r.stdout or "Failed" in r.stdout:
        # the engine returns SUCCESS = 1
        raise RuntimeError(f"CCC_DoseEngine field {f}: rc {r.returncode}\n{r.stdout}")
    return _read_dose(wd / "dose.bin", case["density"].shape), secs


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("case")
    ap.add_argument("out")
    ap.add_argument("--jobs", type=int, default=1)
    args = ap.parse_args()
    exe, kernels, write_beam, version = _engine()
    case = dict(np.load(args.case))
    dens = np.ascontiguousarray(case["density"], dtype=np.float32)
    sp = np.asarray(case["spacing_mm"], float) / 10.0
    with tempfile.TemporaryDirectory(prefix="ccc_") as tmp:
        tmp = Path(tmp)
        with open(tmp / "kernels.txt", "w") as fh:
            fh.write(f"kernel_header\n{kernels / 'kernel_header.txt'}\n")
            fh.writelines(f"kernel_{n}\n{kernels / (n + '.bin')}\n" for n in KERNEL_FILES)
        m, n, q = dens.shape
        (tmp / "header.txt").write_text(
            f"Xcount Ycount Zcount\n{m} {n} {q}\nXstart Ystart Zstart\n0 0 0\n"
            f"dx dy dz\n{sp[0]:.6f} {sp[1]:.6f} {sp[2]:.6f}\n")
        dens.ravel(order="F").tofile(tmp / "density.bin")
        (tmp / "geometry.txt").write_text(f"geometry_header\n{tmp / 'header.txt'}\n"
                                          f"geometry_density\n{tmp / 'density.bin'}\n")
        nf = case["source_mm"].shape[0]
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            res = list(pool.map(lambda f: run_field(exe, tmp / "kernels.txt",
                                                    tmp / "geometry.txt", write_beam,
                                                    case, f, tmp), range(nf)))
    np.savez_compressed(args.out, dose=np.stack([r[0] for r in res]),
                        seconds=np.array([r[1] for r in res]), version=version)
    print(f"opentps-core {version} CCC: {nf} field(s), "
          + ", ".join(f"{r[1]:.0f} s" for r in res), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
