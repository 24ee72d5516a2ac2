"""Fuzz corpus of bad inputs (issue #19): every class of bad input the CLI can be fed, each
generated in code, each asserting the input-error contract:

* exit code 2;
* exactly one line on stderr, naming the file and the field (or the option) concerned;
* no traceback;
* nothing written: ``--out`` is not created and no file in the test's folder (inputs,
  working directory, error-log folder) is added, changed or removed.

The CLI runs in-process (``atp.cli.main(argv)``). Cases are built on the fly from small
templates (an OpenKBP npz, an OpenKBP CSV folder, a DICOM series, a saved plan folder)
that each class makes once per module.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
import tracemalloc
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from atp.cli import main

# --- the contract ---------------------------------------------------------------------------


def _snapshot(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (p.is_dir(), st.st_size, st.st_mtime_ns)
    return out


@dataclass
class Case:
    """argv (with {in} / {out} placeholders), what the one stderr line must name."""

    id: str
    cls: str
    build: object          # build(folder: Path) -> None: writes the inputs into folder
    argv: list
    file: str | None       # a substring of the file named (None: an option, no file)
    field: str             # a substring of the field (or option) named


def check_input_error(case: Case, tmp_path: Path, capsys, monkeypatch) -> str:
    inp = tmp_path / "in"
    inp.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    logs = tmp_path / "logs"
    logs.mkdir()
    case.build(inp)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("ATP_LOG_DIR", str(logs))
    out = tmp_path / "out"
    argv = [str(a).replace("{in}", str(inp)).replace("{out}", str(out)) for a in case.argv]
    before = _snapshot(tmp_path)
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse
        rc = exc.code
    cap = capsys.readouterr()
    err = cap.err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, f"exit {rc}; stderr: {err[-2000:]}"
    assert "Traceback" not in err and "Traceback" not in cap.out
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}: {err[-2000:]}"
    line = lines[0]
    assert len(line) < 1000, f"error line of {len(line)} chars"
    if case.file is not None:
        assert case.file in line, f"file {case.file!r} not named: {line}"
    assert case.field in line, f"field {case.field!r} not named: {line}"
    assert not out.exists(), "--out was written"
    assert _snapshot(tmp_path) == before, "files outside --out were touched"
    return line


# --- templates ------------------------------------------------------------------------------
N = 128


def _openkbp_arrays() -> dict:
    """A valid synthetic OpenKBP patient (128^3): body, PTV70, cord, parotids."""
    k = np.indices((N, N, N), dtype=np.int16)
    r2 = (k[0] - 64) ** 2 + (k[1] - 64) ** 2
    body = r2 <= 45 ** 2
    ptv = (k[0] - 64) ** 2 + (k[1] - 54) ** 2 + (k[2] - 64) ** 2 <= 12 ** 2
    cord = ((k[0] - 90) ** 2 + (k[1] - 64) ** 2 <= 4 ** 2) & body
    rois = np.array(["SpinalCord", "PTV70"])
    masks = (cord.astype(np.uint16) | (ptv.astype(np.uint16) << 1))
    ct = np.where(body, 1064, 0).astype(np.uint16)
    return {"ct": ct, "masks": masks, "rois": rois,
            "voxel_mm": np.array([3.5, 3.5, 2.0], np.float32),
            "possible_dose_mask": np.packbits(body.reshape(-1))}


@pytest.fixture(scope="module")
def okbp_template(tmp_path_factory) -> dict:
    return _openkbp_arrays()


def _npz(name: str, change):
    """build(): the template npz with ``change(arrays)`` applied, as ``{in}/name``."""
    def build(folder: Path):
        arrays = dict(_ARRAYS)
        change(arrays)
        np.savez(folder / name, **arrays)
    return build


_ARRAYS: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _arrays(okbp_template):
    _ARRAYS.clear()
    _ARRAYS.update(okbp_template)


def _set(key, value):
    def change(a):
        a[key] = value
    return change


def _drop(key):
    def change(a):
        a.pop(key)
    return change


def _raw(name: str, data: bytes):
    def build(folder: Path):
        (folder / name).write_bytes(data)
    return build


def _text(name: str, text: str):
    def build(folder: Path):
        (folder / name).write_text(text, encoding="utf-8")
    return build


def _truncated_npz(folder: Path):
    np.savez_compressed(folder / "pt.npz", **_ARRAYS)
    data = (folder / "pt.npz").read_bytes()
    (folder / "pt.npz").write_bytes(data[: len(data) // 2])


def _huge_member_npz(folder: Path):
    """A member whose header declares 4096^3 float64 (512 GB) but holds 8 bytes."""
    path = folder / "pt.npz"
    np.savez(path, **_ARRAYS)
    hdr = {"descr": "<f8", "fortran_order": False, "shape": (4096, 4096, 4096)}
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, hdr)
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("dose.npy", buf.getvalue() + b"\0" * 8)


def _pickle_npz(folder: Path):
    arrays = dict(_ARRAYS)
    arrays["rois"] = np.array([{"a": 1}, "PTV70"], dtype=object)
    np.savez(folder / "pt.npz", **arrays)


def _negative_masks(a):
    m = a["masks"].astype(np.int16)
    m[0, 0, 0] = -1
    a["masks"] = m


PT = "{in}/pt.npz"
PLAN_ARGS = ["--out", "{out}", "--quiet"]

OPENKBP = [
    Case("okbp-ct-all-nan", "openkbp", _npz("pt.npz", _set("ct", np.full((N, N, N), np.nan,
                                                                        np.float32))),
         ["plan", PT, *PLAN_ARGS], "pt.npz", "ct"),
    Case("okbp-ct-string", "openkbp", _npz("pt.npz", _set("ct", np.array(["a"] * 8))),
         ["plan", PT, *PLAN_ARGS], "pt.npz", "ct"),
    Case("okbp-ct-complex", "openkbp",
         _npz("pt.npz", lambda a: a.__setitem__("ct", a["ct"].astype(np.complex64))),
         ["plan", PT, *PLAN_ARGS], "pt.npz", "ct"),
    Case("okbp-ct-wrong-shape", "openkbp", _npz("pt.npz", _set("ct", np.zeros((4, 4, 4)))),
         ["plan", PT, *PLAN_ARGS], "pt.npz", "ct"),
    Case("okbp-ct-negative-hu", "openkbp", _npz("pt.npz", _set("ct", np.full(
        (N, N, N), -3000.0, np.float32))), ["plan", PT, *PLAN_ARGS], "pt.npz", "ct"),
    Case("okbp-voxel-2-long", "openkbp", _npz("pt.npz", _set("voxel_mm", np.array([3., 3.]))),
         ["plan", PT, *PLAN_ARGS], "pt.npz", "voxel_mm"),
    Case("okbp-voxel-1e30", "openkbp", _npz("pt.npz", _set("voxel_mm", np.array([1e30, 3, 3]))),
         ["plan", PT, *PLAN_ARGS], "pt.npz", "voxel_mm"),
    Case("okbp-voxel-nan", "openkbp", _npz("pt.npz", _set("voxel_mm", np.array([np.nan, 3, 3]))),
         ["plan", PT, *PLAN_ARGS], "pt.npz", "voxel_mm"),
    Case("okbp-voxel-zero", "openkbp", _npz("pt.npz", _set("voxel_mm", np.array([0., 3, 3]))),
         ["plan", PT, *PLAN_ARGS], "pt.npz", "voxel_mm"),
    Case("okbp-voxel-negative", "openkbp",
         _npz("pt.npz", _set("voxel_mm", np.array([-3., 3, 3]))),
         ["plan", PT, *PLAN_ARGS], "pt.npz", "voxel_mm"),
    Case("okbp-voxel-string", "openkbp", _npz("pt.npz", _set("voxel_mm", np.array(["3"] * 3))),
         ["plan", PT, *PLAN_ARGS], "pt.npz", "voxel_mm"),
    Case("okbp-masks-negative", "openkbp", _npz("pt.npz", _negative_masks),
         ["plan", PT, *PLAN_ARGS], "pt.npz", "masks"),
    Case("okbp-masks-float", "openkbp",
         _npz("pt.npz", lambda a: a.__setitem__("masks", a["masks"].astype(np.float32))),
         ["plan", PT, *PLAN_ARGS], "pt.npz", "masks"),
    Case("okbp-rois-numbers", "openkbp", _npz("pt.npz", _set("rois", np.array([1, 2]))),
         ["plan", PT, *PLAN_ARGS], "pt.npz", "rois"),
    Case("okbp-rois-pickle", "openkbp", _pickle_npz, ["plan", PT, *PLAN_ARGS], "pt.npz",
         "rois"),
    Case("okbp-missing-ct", "openkbp", _npz("pt.npz", _drop("ct")),
         ["plan", PT, *PLAN_ARGS], "pt.npz", "ct"),
    Case("okbp-dose-nan", "openkbp", _npz("pt.npz", _set("dose", np.full((N, N, N), np.nan,
                                                                        np.float32))),
         ["plan", PT, *PLAN_ARGS], "pt.npz", "dose"),
    Case("okbp-dose-negative", "openkbp", _npz("pt.npz", _set("dose", np.full(
        (N, N, N), -5.0, np.float32))), ["plan", PT, *PLAN_ARGS], "pt.npz", "dose"),
    Case("okbp-possible-mask-short", "openkbp",
         _npz("pt.npz", _set("possible_dose_mask", np.zeros(10, np.uint8))),
         ["plan", PT, *PLAN_ARGS], "pt.npz", "possible_dose_mask"),
    Case("okbp-member-header-huge", "openkbp", _huge_member_npz,
         ["plan", PT, *PLAN_ARGS], "pt.npz", "dose"),
    Case("okbp-truncated", "openkbp", _truncated_npz, ["plan", PT, *PLAN_ARGS], "pt.npz",
         "pt.npz"),
    Case("okbp-not-a-zip", "openkbp", _raw("pt.npz", b"PK\x03\x04 this is not a zip"),
         ["plan", PT, *PLAN_ARGS], "pt.npz", "pt.npz"),
]


# OpenKBP CSV folders ----------------------------------------------------------------------
def _csv_folder(change=None):
    def build(folder: Path):
        pt = folder / "pt_9"
        pt.mkdir()
        a = _ARRAYS
        flat_ct = a["ct"].reshape(-1)
        idx = np.flatnonzero(flat_ct)
        (pt / "ct.csv").write_text(",data\n" + "".join(
            f"{i},{v}\n" for i, v in zip(idx[::50], flat_ct[idx[::50]])))
        (pt / "voxel_dimensions.csv").write_text("3.5\n3.5\n2.0\n")
        ptv = np.flatnonzero((a["masks"] >> 1) & 1)
        (pt / "PTV70.csv").write_text(",data\n" + "".join(f"{i},\n" for i in ptv))
        if change:
            change(pt)
    return build


def _write(name, text):
    def change(pt: Path):
        (pt / name).write_text(text) if isinstance(text, str) else (pt / name).write_bytes(
            text)
    return change


CSV = "{in}/pt_9"
OPENKBP_CSV = [
    Case("csv-voxel-2-values", "openkbp-csv", _csv_folder(_write("voxel_dimensions.csv",
                                                                  "3.5\n3.5\n")),
         ["plan", CSV, *PLAN_ARGS], "voxel_dimensions.csv", "voxel_mm"),
    Case("csv-voxel-nan", "openkbp-csv", _csv_folder(_write("voxel_dimensions.csv",
                                                             "nan\n3.5\n2\n")),
         ["plan", CSV, *PLAN_ARGS], "voxel_dimensions.csv", "voxel_mm"),
    Case("csv-voxel-1e30", "openkbp-csv", _csv_folder(_write("voxel_dimensions.csv",
                                                              "1e30\n3.5\n2\n")),
         ["plan", CSV, *PLAN_ARGS], "voxel_dimensions.csv", "voxel_mm"),
    Case("csv-voxel-text", "openkbp-csv", _csv_folder(_write("voxel_dimensions.csv",
                                                              "a b c\n")),
         ["plan", CSV, *PLAN_ARGS], "voxel_dimensions.csv", "voxel_mm"),
    Case("csv-ct-nan", "openkbp-csv", _csv_folder(_write("ct.csv", ",data\n5,nan\n")),
         ["plan", CSV, *PLAN_ARGS], "ct.csv", "data"),
    Case("csv-ct-index-outside", "openkbp-csv",
         _csv_folder(_write("ct.csv", f",data\n{N ** 3},1000\n")),
         ["plan", CSV, *PLAN_ARGS], "ct.csv", "index"),
    Case("csv-ct-index-huge", "openkbp-csv",
         _csv_folder(_write("ct.csv", ",data\n" + "9" * 40 + ",1000\n")),
         ["plan", CSV, *PLAN_ARGS], "ct.csv", "data"),
    Case("csv-ct-value-huge", "openkbp-csv", _csv_folder(_write("ct.csv", ",data\n5,1e9\n")),
         ["plan", CSV, *PLAN_ARGS], "ct.csv", "data"),
    Case("csv-ct-not-utf8", "openkbp-csv", _csv_folder(_write("ct.csv", b"\xff\xfe\x00\x81")),
         ["plan", CSV, *PLAN_ARGS], "ct.csv", "data"),
    Case("csv-dose-negative", "openkbp-csv", _csv_folder(_write("dose.csv", ",data\n5,-3\n")),
         ["plan", CSV, *PLAN_ARGS], "dose.csv", "data"),
]


# goal lists, overlays (YAML) --------------------------------------------------------------
def _hn_yaml() -> str:
    from atp.goals.loader import goal_lists_dir

    return (goal_lists_dir() / "hn.yaml").read_text()


def _goal_list(edit):
    """build(): the shipped hn list with ``edit(text) -> text`` applied, as {in}/gl.yaml."""
    def build(folder: Path):
        (folder / "gl.yaml").write_text(edit(_hn_yaml()))
    return build


def _replace(old, new):
    def edit(text):
        assert old in text, old
        return text.replace(old, new, 1)
    return edit


_CORD = ("    value: 45\n    priority: 1\n")


def _cord(extra: str):
    return _replace(_CORD, _CORD + extra)


ALIAS_BOMB = (
    "site: hn\n"
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    "b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
    "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
    "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
    "e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
    "f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n"
    "g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\n"
    "h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]\n"
    "description: [*h,*h,*h,*h,*h,*h,*h,*h,*h]\n"
)
GL = ["plan", "phantom", "--goal-list", "{in}/gl.yaml", *PLAN_ARGS]

GOAL_LISTS = [
    Case("yaml-alias-bomb", "yaml", _text("gl.yaml", ALIAS_BOMB), GL, "gl.yaml:", "gl.yaml"),
    Case("yaml-recursive-alias", "yaml", _text("gl.yaml", "site: hn\ngoals: &g [*g]\n"), GL,
         "gl.yaml:", "gl.yaml"),
    Case("yaml-deep-nesting", "yaml", _text("gl.yaml", "site: hn\ngoals: " + "[" * 3000
                                             + "]" * 3000 + "\n"), GL, "gl.yaml", "gl.yaml"),
    Case("yaml-duplicate-key", "yaml", _goal_list(_replace("site: hn\n", "site: hn\nsite: hn\n")),
         GL, "gl.yaml:", "site"),
    Case("yaml-description-list", "yaml",
         _goal_list(_replace("description: >-", "description: [1, 2]\nold_description: >-")),
         GL, "gl.yaml", "old_description"),
    Case("yaml-description-mapping", "yaml", _text("gl.yaml", "site: hn\ndescription: {a: 1}\n"
                                                   "goals: [{structure: PTV_70, metric: D95%,"
                                                   " operator: '>=', value: 70}]\n"),
         GL, "gl.yaml", "description"),
    Case("yaml-long-key-quoted-short", "yaml",
         _goal_list(_replace("site: hn\n", "site: hn\n? " + "k" * 100_000 + "\n: 1\n")),
         GL, "gl.yaml", "kkkk"),
    Case("yaml-priority-weights-overflow", "yaml",
         _goal_list(_replace("{base: 10, top: 3}", "{base: 10, top: 400}")), GL, "gl.yaml",
         "priority_weights.top"),
    Case("yaml-priority-weights-base-huge", "yaml",
         _goal_list(_replace("{base: 10, top: 3}", "{base: 1.0e+300, top: 3}")), GL, "gl.yaml",
         "priority_weights.base"),
    Case("yaml-weight-1e308", "yaml", _goal_list(_cord("    weight: 1.0e+308\n")), GL,
         "gl.yaml", "goals[0].weight"),
    Case("yaml-weight-nan", "yaml", _goal_list(_cord("    weight: .nan\n")), GL, "gl.yaml",
         ".weight"),
    Case("yaml-weight-inf", "yaml", _goal_list(_cord("    weight: .inf\n")), GL, "gl.yaml",
         ".weight"),
    Case("yaml-priority-inf", "yaml", _goal_list(_replace(_CORD, "    value: 45\n"
                                                          "    priority: .inf\n")),
         GL, "gl.yaml", ".priority"),
    Case("yaml-value-negative", "yaml", _goal_list(_replace(_CORD, "    value: -5\n"
                                                            "    priority: 1\n")),
         GL, "gl.yaml", ".value"),
    Case("yaml-value-inf", "yaml", _goal_list(_replace(_CORD, "    value: .inf\n"
                                                       "    priority: 1\n")),
         GL, "gl.yaml", ".value"),
    Case("yaml-tolerance-nan", "yaml",
         _goal_list(_replace("tolerance: -5", "tolerance: .nan")), GL, "gl.yaml", ".tolerance"),
    Case("yaml-note-not-text", "yaml",
         _goal_list(_replace('    note: "RTOG 0615 / NRG HN001: spinal cord max 45 Gy"\n',
                             "    note: [1, 2]\n")), GL, "gl.yaml", ".note"),
    Case("yaml-goal-is-text", "yaml", _text("gl.yaml", "site: hn\ngoals: [just text]\n"), GL,
         "gl.yaml", "goals[0]"),
    Case("yaml-metric-mapping", "yaml",
         _goal_list(_replace("    metric: D0.1cc\n", "    metric: {a: 1}\n")), GL, "gl.yaml",
         ".metric"),
    Case("yaml-unknown-beam-template", "yaml",
         _goal_list(_replace("beam_template: hn_9field", "beam_template: hn_99field")), GL,
         "gl.yaml", "beam_template"),
    Case("yaml-beams-1000", "yaml", _goal_list(_replace("beams: 9", "beams: 1000")), GL,
         "gl.yaml", "beams"),
    Case("yaml-not-utf8", "yaml", _raw("gl.yaml", b"site: hn\n\xff\xfe\x81\n"), GL, "gl.yaml",
         "gl.yaml"),
    Case("yaml-python-tag", "yaml", _text("gl.yaml", "site: !!python/object/apply:os.system "
                                                     "['touch pwned']\n"), GL, "gl.yaml",
         "gl.yaml"),
    Case("yaml-folder", "yaml", lambda f: (f / "gl.yaml").mkdir(), GL, "gl.yaml", "gl.yaml"),
]


# institution overlays -----------------------------------------------------------------------
def _overlay(body: str):
    return _text("ov.yaml", "institution: test\nsites:\n  hn:\n" + body)


OV = ["plan", "phantom", "--site", "hn", "--institution", "{in}/ov.yaml", *PLAN_ARGS]
OVERLAYS = [
    Case("overlay-unknown-beam-template", "overlay", _overlay("    beam_template: hn_11field\n"),
         OV, "ov.yaml", "beam_template"),
    Case("overlay-beams-0", "overlay", _overlay("    beams: 0\n"), OV, "ov.yaml", "beams"),
    Case("overlay-duplicate-key", "overlay",
         _overlay("    beams: 9\n    beams: 7\n"), OV, "ov.yaml", "beams"),
    Case("overlay-priority-weights-overflow", "overlay",
         _overlay("    priority_weights: {base: 10, top: 400}\n"), OV, "ov.yaml",
         "priority_weights.top"),
    Case("overlay-table-weight-huge", "overlay",
         _overlay("    priority_weights: {table: {1: 1.0e+308}}\n"), OV, "ov.yaml",
         "priority_weights.table"),
    Case("overlay-description-list", "overlay",
         _text("ov.yaml", "institution: test\ndescription: [a, b]\nsites: {hn: {}}\n"), OV,
         "ov.yaml", "description"),
    Case("overlay-sites-list", "overlay", _text("ov.yaml", "institution: test\nsites: [hn]\n"),
         OV, "ov.yaml", "sites"),
    Case("overlay-modify-set-metric", "overlay",
         _overlay("    modify:\n      - goal: Larynx.Dmean\n        set: {metric: Dmax}\n"), OV,
         "ov.yaml", "modify.set.metric"),
    Case("overlay-set-weight-nan", "overlay",
         _overlay("    modify:\n      - goal: Larynx.Dmean\n        set: {weight: .nan}\n"), OV,
         "ov.yaml", ".weight"),
]


# DICOM ------------------------------------------------------------------------------------
def _dicom(corrupt=None, *, roi_names=("PTV_70", "SpinalCord"), sidecar: str | None = None):
    def build(folder: Path):
        from dicom_fixtures import write_ct_series, write_rtstruct

        d = folder / "dcm"
        ct = write_ct_series(d, shape=(6, 24, 24), spacing_mm=(3.0, 2.0, 2.0))
        z = [ct.origin_mm[2] + k * 3.0 for k in range(1, 5)]
        x0, y0 = ct.origin_mm[0], ct.origin_mm[1]

        def square(cx, cy, r, zz):
            return np.array([[x0 + cx - r, y0 + cy - r, zz], [x0 + cx + r, y0 + cy - r, zz],
                             [x0 + cx + r, y0 + cy + r, zz], [x0 + cx - r, y0 + cy + r, zz]])
        rois = [(roi_names[0], [square(24, 24, 8, zz) for zz in z]),
                (roi_names[1], [square(24, 40, 3, zz) for zz in z])]
        write_rtstruct(d / "RS.dcm", ct, rois)
        if sidecar is not None:
            (d / "prescription.yaml").write_text(sidecar)
        if corrupt:
            corrupt(d, ct)
    return build


def _edit_ds(name_or_first_ct, edit):
    def corrupt(d: Path, ct):
        import pydicom

        path = d / "RS.dcm" if name_or_first_ct == "RS" else ct.files[0]
        ds = pydicom.dcmread(path)
        edit(ds)
        ds.save_as(path, enforce_file_format=False)
    return corrupt


def _bytes_ct(old: bytes, new: bytes):
    """Rewrite the first CT file with PixelSpacing 7.7777 mm, then replace bytes (an
    attribute pydicom itself would not let us write)."""
    def corrupt(d: Path, ct):
        import pydicom

        ds = pydicom.dcmread(ct.files[0])
        ds.PixelSpacing = ["7.7777", "7.7777"]
        ds.save_as(ct.files[0], enforce_file_format=False)
        data = ct.files[0].read_bytes()
        assert old in data
        ct.files[0].write_bytes(data.replace(old, new))
    return corrupt


def _edit_all_ct(edit):
    def corrupt(d: Path, ct):
        import pydicom

        for path in ct.files:
            ds = pydicom.dcmread(path)
            edit(ds)
            ds.save_as(path, enforce_file_format=False)
    return corrupt


def _truncate_rs(d: Path, ct):
    data = (d / "RS.dcm").read_bytes()
    (d / "RS.dcm").write_bytes(data[: int(len(data) * 0.6)])


def _del(attr):
    return lambda ds: delattr(ds, attr)


def _del_roi_number(ds):
    del ds.StructureSetROISequence[0].ROINumber


def _del_ref_roi_number(ds):
    del ds.ROIContourSequence[0].ReferencedROINumber


def _set_attr(attr, value):
    return lambda ds: setattr(ds, attr, value)


DCM = ["plan", "{in}/dcm", "--rx", "PTV_70=70", "--fractions", "35", *PLAN_ARGS]
DICOM = [
    Case("dicom-truncated-rtstruct", "dicom", _dicom(_truncate_rs), DCM, "RS.dcm", "RS.dcm"),
    Case("dicom-missing-roinumber", "dicom", _dicom(_edit_ds("RS", _del_roi_number)), DCM,
         "RS.dcm", "ROINumber"),
    Case("dicom-missing-referenced-roinumber", "dicom",
         _dicom(_edit_ds("RS", _del_ref_roi_number)), DCM, "RS.dcm", "ReferencedROINumber"),
    Case("dicom-image-without-rows", "dicom", _dicom(_edit_ds("CT", _del("Rows"))), DCM,
         "CT_", "Rows"),
    Case("dicom-rows-huge", "dicom", _dicom(_edit_ds("CT", _set_attr("Rows", 60000))), DCM,
         "CT_", "Rows"),
    Case("dicom-pixel-spacing-zero", "dicom",
         _dicom(_edit_ds("CT", _set_attr("PixelSpacing", ["0", "0"]))), DCM, "CT_",
         "PixelSpacing"),
    Case("dicom-pixel-spacing-text", "dicom",
         _dicom(_bytes_ct(b"7.7777\\7.7777", b"abcdef\\ghijkl")), DCM, "CT_",
         "PixelSpacing"),
    Case("dicom-missing-orientation", "dicom",
         _dicom(_edit_ds("CT", _del("ImageOrientationPatient"))), DCM, "CT_",
         "ImageOrientationPatient"),
    Case("dicom-rescale-slope-zero", "dicom", _dicom(_edit_all_ct(_set_attr("RescaleSlope", "0"))),
         DCM, "CT_", "RescaleSlope"),
    Case("dicom-rescale-slope-huge", "dicom",
         _dicom(_edit_all_ct(_set_attr("RescaleSlope", "1000"))), DCM, "CT_", "PixelData"),
    Case("dicom-pixel-data-short", "dicom",
         _dicom(_edit_ds("CT", lambda ds: setattr(ds, "PixelData", ds.PixelData[:100]))), DCM,
         "CT_", "PixelData"),
    Case("dicom-position-nan", "dicom",
         _dicom(_edit_ds("CT", _set_attr("ImagePositionPatient", ["nan", "0", "0"]))), DCM,
         "CT_", "ImagePositionPatient"),
    Case("dicom-rows-differ", "dicom", _dicom(_edit_ds("CT", _set_attr("Rows", 12))), DCM, "CT_",
         "Rows"),
    Case("dicom-not-dicom", "dicom", _dicom(lambda d, ct: (d / "junk.dcm").write_bytes(b"x" * 300)),
         DCM, "junk.dcm", "junk.dcm"),
    Case("dicom-rx-nan", "dicom", _dicom(), ["plan", "{in}/dcm", "--rx", "PTV_70=nan",
                                             "--fractions", "35", *PLAN_ARGS], None, "--rx"),
    Case("dicom-fractions-0", "dicom", _dicom(), ["plan", "{in}/dcm", "--rx", "PTV_70=70",
                                                  "--fractions", "0", *PLAN_ARGS], None,
         "--fractions"),
]

# prescription sidecars -----------------------------------------------------------------------
RX = ["plan", "{in}/dcm", *PLAN_ARGS]
SIDECARS = [
    Case("sidecar-duplicate-key", "sidecar",
         _dicom(sidecar="fractions: 35\nfractions: 30\ntargets: {PTV_70: 70}\n"), RX,
         "prescription.yaml", "fractions"),
    Case("sidecar-duplicate-target", "sidecar",
         _dicom(sidecar="fractions: 35\ntargets: {PTV_70: 70, PTV_70: 60}\n"), RX,
         "prescription.yaml", "PTV_70"),
    Case("sidecar-fractions-inf", "sidecar", _dicom(sidecar="fractions: .inf\ntargets: "
                                                    "{PTV_70: 70}\n"), RX,
         "prescription.yaml", "fractions"),
    Case("sidecar-dose-negative", "sidecar", _dicom(sidecar="fractions: 35\ntargets: "
                                                    "{PTV_70: -70}\n"), RX,
         "prescription.yaml", "targets.PTV_70"),
    Case("sidecar-dose-nan", "sidecar", _dicom(sidecar="fractions: 35\ntargets: "
                                               "{PTV_70: .nan}\n"), RX,
         "prescription.yaml", "targets.PTV_70"),
    Case("sidecar-alias-bomb", "sidecar", _dicom(sidecar=ALIAS_BOMB.replace("site: hn\n", "")),
         RX, "prescription.yaml", "prescription.yaml"),
]


# saved plans: replan --set and corrupt plan folders ------------------------------------------
@pytest.fixture(scope="module")
def plan_template(tmp_path_factory) -> Path:
    from atp.optimizer.testing import toy_dij

    import atp
    from atp.phantom import head_neck_phantom

    phantom = head_neck_phantom()
    dij = toy_dij(phantom, n_beams=3, factor=3)
    plan = atp.plan(phantom, site="hn", predictor="baseline", dij=dij, backend="cpu",
                    progress=False, optimizer_options={"max_iter": 20, "attain_rounds": 0},
                    sequence=False)
    out = tmp_path_factory.mktemp("plan") / "plan"
    plan.save(out, report=False)
    _PLAN[0] = out
    return out


_PLAN: list = [None]


def _plan(corrupt=None):
    def build(folder: Path):
        shutil.copytree(_PLAN[0], folder / "plan")
        if corrupt:
            corrupt(folder / "plan")
    return build


def _edit_json(edit):
    def corrupt(p: Path):
        data = json.loads((p / "plan.json").read_text())
        edit(data)
        (p / "plan.json").write_text(json.dumps(data))
    return corrupt


def _goal0(key, value):
    return _edit_json(lambda d: d["goals"][0].__setitem__(key, value))


def _setting(key, value):
    return _edit_json(lambda d: d["settings"].__setitem__(key, value))


def _replace_file(name, data: bytes | None):
    def corrupt(p: Path):
        if data is None:
            (p / name).unlink()
        else:
            (p / name).write_bytes(data)
    return corrupt


def _truncate(name):
    def corrupt(p: Path):
        b = (p / name).read_bytes()
        (p / name).write_bytes(b[: len(b) // 2])
    return corrupt


def _pickle_npy(name):
    def corrupt(p: Path):
        np.save(p / name, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    return corrupt


def _pickle_member(name, member):
    def corrupt(p: Path):
        with np.load(p / name) as f:
            arrays = {k: f[k] for k in f.files}
        arrays[member] = np.array([{"x": 1}], dtype=object)
        np.savez(p / name, **arrays)
    return corrupt


def _fluence(value):
    def corrupt(p: Path):
        with np.load(p / "fluence.npz") as f:
            arrays = {k: f[k] for k in f.files}
        fl = arrays["fluence"].copy()
        fl[0] = value
        arrays["fluence"] = fl
        np.savez(p / "fluence.npz", **arrays)
    return corrupt


def _rp(*sets):
    argv = ["replan", "{in}/plan", "--out", "{out}", "--quiet"]
    for s in sets:
        argv += ["--set", s]
    return argv


REPLAN_SET = [
    Case("set-value-inf-turns-hard-limit-off", "replan-set", _plan(),
         _rp("SpinalCord.D0.1cc.value=inf"), None, "--set SpinalCord.D0.1cc.value"),
    Case("set-weight-nan", "replan-set", _plan(), _rp("Larynx.Dmean.weight=nan"), None,
         "--set Larynx.Dmean.weight"),
    Case("set-weight-1e308", "replan-set", _plan(), _rp("Larynx.Dmean.weight=1e308"), None,
         "--set Larynx.Dmean.weight"),
    Case("set-weight-zero", "replan-set", _plan(), _rp("Larynx.Dmean.weight=0"), None,
         "--set Larynx.Dmean.weight"),
    Case("set-tolerance-nan", "replan-set", _plan(), _rp("Parotid_R.Dmean.tolerance=nan"), None,
         "--set Parotid_R.Dmean.tolerance"),
    Case("set-tolerance-1e400", "replan-set", _plan(), _rp("Parotid_R.Dmean.tolerance=1e400"),
         None, "--set Parotid_R.Dmean.tolerance"),
    Case("set-tolerance-minus-100", "replan-set", _plan(),
         _rp("Parotid_R.Dmean.tolerance=-100"), None, "--set Parotid_R.Dmean.tolerance"),
    Case("set-value-negative", "replan-set", _plan(), _rp("Larynx.Dmean.value=-5"), None,
         "--set Larynx.Dmean.value"),
    Case("set-priority-inf", "replan-set", _plan(), _rp("Larynx.Dmean.priority=inf"), None,
         "--set Larynx.Dmean.priority"),
    Case("set-priority-nan", "replan-set", _plan(), _rp("Larynx.Dmean.priority=nan"), None,
         "--set Larynx.Dmean.priority"),
    Case("set-priority-fraction", "replan-set", _plan(), _rp("Larynx.Dmean.priority=2.5"), None,
         "--set Larynx.Dmean.priority"),
    Case("set-priority-1-on-predicted", "replan-set", _plan(),
         _rp("Larynx.Dmean.pred.priority=1"), None, "--set Larynx.Dmean.pred.priority"),
    Case("set-value-not-a-number", "replan-set", _plan(), _rp("Larynx.Dmean.value=lots"), None,
         "--set Larynx.Dmean.value"),
    Case("set-unknown-goal", "replan-set", _plan(), _rp("Nope.Dmean.value=5"), None, "--set"),
]

PLAN_FILES = [
    Case("plan-json-priority-text", "plan-folder", _plan(_goal0("priority", "high")), _rp(),
         "plan.json", "goals[0].priority"),
    Case("plan-json-weight-nan", "plan-folder", _plan(_goal0("weight", float("nan"))), _rp(),
         "plan.json", "goals[0].weight"),
    Case("plan-json-value-list", "plan-folder", _plan(_goal0("value", [1, 2])), _rp(),
         "plan.json", "goals[0].value"),
    Case("plan-json-operator", "plan-folder", _plan(_goal0("operator", "==")), _rp(),
         "plan.json", "goals[0].operator"),
    Case("plan-json-goals-not-list", "plan-folder",
         _plan(_edit_json(lambda d: d.__setitem__("goals", {"a": 1}))), _rp(), "plan.json",
         "goals"),
    Case("plan-json-source-number", "plan-folder",
         _plan(_edit_json(lambda d: d["patient"].__setitem__("source", 5))), _rp(),
         "plan.json", "patient.source"),
    Case("plan-json-settings-list", "plan-folder",
         _plan(_edit_json(lambda d: d.__setitem__("settings", [1]))), _rp(), "plan.json",
         "settings"),
    Case("plan-json-refine-text", "plan-folder", _plan(_setting("refine", "x")), _rp(),
         "plan.json", "settings.refine"),
    Case("plan-json-backend-list", "plan-folder", _plan(_setting("backend_requested", [1])),
         _rp(), "plan.json", "settings.backend_requested"),
    Case("plan-json-sequencer-unknown", "plan-folder", _plan(_setting("sequence", "zzz")),
         _rp(), "plan.json", "settings.sequence"),
    Case("plan-json-notes-number", "plan-folder", _plan(_setting("resolve_notes", 5)), _rp(),
         "plan.json", "settings.resolve_notes"),
    Case("plan-json-priority-rule-overflow", "plan-folder",
         _plan(_setting("priority_weights", {"base": 10, "top": 400})),
         _rp("Larynx.Dmean.priority=2"), "plan.json", "settings.priority_weights.top"),
    Case("plan-json-hard-state-text", "plan-folder",
         _plan(_edit_json(lambda d: d["optimizer"].__setitem__("hard_state", "junk"))),
         [*_rp(), "--warm"], "plan.json", "optimizer.hard_state"),
    Case("plan-json-not-json", "plan-folder", _plan(_replace_file("plan.json", b"{not json")),
         _rp(), "plan.json", "plan.json"),
    Case("plan-dij-missing", "plan-folder", _plan(_replace_file("dij.npz", None)), _rp(),
         "plan", "dij.npz"),
    Case("plan-dij-truncated", "plan-folder", _plan(_truncate("dij.npz")), _rp(), "dij.npz",
         "dij.npz"),
    Case("plan-dij-pickle", "plan-folder", _plan(_pickle_member("dij.npz", "data")), _rp(),
         "dij.npz", "matrix"),
    Case("plan-dose-pickle", "plan-folder", _plan(_pickle_npy("dose.npy")), _rp(), "dose.npy",
         "dose"),
    Case("plan-dose-truncated", "plan-folder", _plan(_truncate("dose.npy")), _rp(), "dose.npy",
         "dose"),
    Case("plan-dose-wrong-shape", "plan-folder",
         _plan(lambda p: np.save(p / "dose.npy", np.zeros((3, 3, 3), np.float32))), _rp(),
         "dose.npy", "dose"),
    Case("plan-fluence-nan", "plan-folder", _plan(_fluence(np.nan)), _rp(), "fluence.npz",
         "fluence"),
    Case("plan-fluence-negative", "plan-folder", _plan(_fluence(-1.0)), _rp(), "fluence.npz",
         "fluence"),
    Case("plan-predicted-pickle", "plan-folder", _plan(_pickle_npy("predicted_dose.npy")),
         _rp(), "predicted_dose.npy", "predicted_dose"),
]


# network weights and numeric options ---------------------------------------------------------
class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def _evil_pt(folder: Path):
    with open(folder / "w.pt", "wb") as fh:
        pickle.dump(_Evil(), fh)


FAST = ["plan", "phantom", "--fast", *PLAN_ARGS]
WEIGHTS = [
    Case("weights-text-file", "weights", _text("w.pt", "hello"), [*FAST, "--weights",
                                                                  "{in}/w.pt"],
         "w.pt", "--weights"),
    Case("weights-code-pickle", "weights", _evil_pt, [*FAST, "--weights", "{in}/w.pt"],
         "w.pt", "--weights"),
    Case("correction-weights-code-pickle", "weights", _evil_pt,
         [*FAST, "--correction-weights", "{in}/w.pt"], "w.pt", "--correction-weights"),
    Case("correction-weights-npz", "weights", _npz("w.pt", lambda a: None),
         [*FAST, "--correction-weights", "{in}/w.pt"], "w.pt", "--correction-weights"),
    Case("predictor-checkpoint-code-pickle", "weights", _evil_pt,
         ["predict", "phantom", "--predictor", "{in}/w.pt", "--out", "{out}.npy"], "w.pt",
         "weights"),
    Case("predictor-checkpoint-text", "weights", _text("w.pt", "hello"),
         ["predict", "phantom", "--predictor", "{in}/w.pt", "--out", "{out}.npy"], "w.pt",
         "weights"),
    Case("weights-missing", "weights", lambda f: None, [*FAST, "--weights", "{in}/none.pt"],
         "none.pt", "--weights"),
]


def _noop(folder: Path):
    return None


P = ["plan", "phantom", *PLAN_ARGS]
OPTIONS = [
    Case("beams-1000", "options", _noop, [*P, "--beams", "1000"], None, "--beams"),
    Case("beams-0", "options", _noop, [*P, "--beams", "0"], None, "--beams"),
    Case("dose-grid-factor-0", "options", _noop, [*P, "--dose-grid-factor", "0"], None,
         "--dose-grid-factor"),
    Case("refine-negative", "options", _noop, [*P, "--refine", "-1"], None, "--refine"),
    Case("max-iter-0", "options", _noop, [*P, "--max-iter", "0"], None, "--max-iter"),
    Case("arc-spacing-nan", "options", _noop, [*FAST, "--arc-spacing", "nan"], None,
         "--arc-spacing"),
    Case("arc-spacing-0", "options", _noop, [*FAST, "--arc-spacing", "0"], None,
         "--arc-spacing"),
    Case("aperture-iterations-negative", "options", _noop,
         [*FAST, "--aperture-iterations", "-3"], None, "--aperture-iterations"),
    Case("fractions-0", "options", _noop, [*P, "--fractions", "0"], None, "--fractions"),
    Case("rx-on-phantom-not-ignored", "options", _noop, [*P, "--rx", "PTV_70=60"], "phantom",
         "--rx"),
    Case("fractions-on-openkbp-not-ignored", "options", _npz("pt.npz", lambda a: None),
         ["plan", PT, "--fractions", "30", *PLAN_ARGS], "pt.npz", "--fractions"),
    Case("rx-empty-target", "options", _noop, [*P, "--rx", "=70"], None, "--rx"),
    Case("rx-inf", "options", _noop, [*P, "--rx", "PTV_70=1e400"], None, "--rx"),
    Case("beam-template-unknown", "options", _noop, [*P, "--beam-template", "hn_99"], None,
         "--beam-template"),
    Case("dose-engine-unknown", "options", _noop, [*P, "--dose-engine", "monte-carlo-9"], None,
         "monte-carlo-9"),
    Case("initial-fluence-unknown", "options", _noop, [*FAST, "--initial-fluence", "magic"],
         None, "--initial-fluence"),
    Case("correction-unknown", "options", _noop, [*FAST, "--correction", "magic"], None,
         "--correction"),
    Case("dij-beams-1000", "options", _noop, ["dij", "phantom", "--beams", "1000", "--out",
                                              "{out}"], None, "--beams"),
    Case("dij-couch-inf", "options", _noop, ["dij", "phantom", "--couch", "inf", "--out",
                                             "{out}"], None, "--couch"),
]

# machine models (sequencer YAML) --------------------------------------------------------
def _machine(edit):
    def build(folder: Path):
        from atp.sequencer.machine import MACHINE_DIR

        (folder / "m.yaml").write_text(edit((MACHINE_DIR / "millennium120.yaml").read_text()))
    return build


M = ["plan", "phantom", "--machine", "{in}/m.yaml", *PLAN_ARGS]
MACHINES = [
    Case("machine-duplicate-key", "machine",
         _machine(_replace("nominal_energy_mv: 6.0\n", "nominal_energy_mv: 6.0\n"
                           "nominal_energy_mv: 10.0\n")), M, "m.yaml", "nominal_energy_mv"),
    Case("machine-sad-inf", "machine",
         _machine(_replace("source_axis_distance_mm: 1000.0", "source_axis_distance_mm: .inf")),
         M, "m.yaml", "source_axis_distance_mm"),
    Case("machine-leaf-count-huge", "machine",
         _machine(_replace("[[10.0, 10], [5.0, 40], [10.0, 10]]",
                           "[[10.0, 10], [5.0, 4000000000], [10.0, 10]]")), M, "m.yaml",
         "mlc.leaf_widths_mm"),
    Case("machine-sad-1e30", "machine",
         _machine(_replace("source_axis_distance_mm: 1000.0", "source_axis_distance_mm: 1e30")),
         M, "m.yaml", "source_axis_distance_mm"),
    Case("machine-leaf-range-huge", "machine",
         _machine(lambda t: t.replace("leaf_position_range_mm:", "leaf_position_range_mm: "
                                      "[-1.0e+9, 1.0e+9]\n  old_range:", 1)), M, "m.yaml",
         "mlc"),
    Case("machine-alias-bomb", "machine", _text("m.yaml", ALIAS_BOMB), M, "m.yaml:", "m.yaml"),
    Case("machine-fast-path", "machine",
         _machine(_replace("max_leaf_speed_mm_s: 25.0", "max_leaf_speed_mm_s: -25.0")),
         ["plan", "phantom", "--fast", "--machine", "{in}/m.yaml", *PLAN_ARGS], "m.yaml",
         "mlc.max_leaf_speed_mm_s"),
]


# arrays given on the command line: --predicted-dose, --dij -----------------------------
def _npy(name, array, **kw):
    def build(folder: Path):
        np.save(folder / name, array, **kw)
    return build


PD = ["plan", "phantom", "--predicted-dose", "{in}/pd.npy", *PLAN_ARGS]
DJ = ["plan", "phantom", "--dij", "{in}/dij.npz", *PLAN_ARGS]
ARRAYS = [
    Case("predicted-dose-pickle", "arrays",
         _npy("pd.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True), PD, "pd.npy",
         "predicted dose"),
    Case("predicted-dose-wrong-shape", "arrays", _npy("pd.npy", np.zeros((2, 2, 2))), PD,
         "pd.npy", "shape"),
    Case("predicted-dose-nan", "arrays",
         _npy("pd.npy", np.full((40, 64, 64), np.nan, np.float32)), PD, "pd.npy",
         "predicted dose"),
    Case("predicted-dose-text", "arrays", _text("pd.npy", "1,2,3"), PD, "pd.npy",
         "predicted dose"),
    Case("dij-not-atp", "arrays", _npz("dij.npz", lambda a: None), DJ, "dij.npz", "format"),
    Case("dij-truncated", "arrays", _raw("dij.npz", b"PK\x03\x04" + b"\0" * 40), DJ, "dij.npz",
         "dij.npz"),
]

ALL = (OPENKBP + OPENKBP_CSV + GOAL_LISTS + OVERLAYS + DICOM + SIDECARS + REPLAN_SET
       + PLAN_FILES + WEIGHTS + OPTIONS + MACHINES + ARRAYS)


@pytest.mark.parametrize("case", ALL, ids=[c.id for c in ALL])
def test_bad_input_is_one_line_exit_2_nothing_written(case, tmp_path, capsys, monkeypatch,
                                                      plan_template):
    check_input_error(case, tmp_path, capsys, monkeypatch)
    assert not (tmp_path / "cwd" / "PWNED").exists()


def test_corpus_covers_every_class():
    classes = {c.cls for c in ALL}
    assert classes == {"openkbp", "openkbp-csv", "yaml", "overlay", "dicom", "sidecar",
                       "replan-set", "plan-folder", "weights", "options", "machine", "arrays"}
    assert len({c.id for c in ALL}) == len(ALL)


# --- the alias bomb's cost, the optimiser's finite check, the report's labels ---------------
def test_alias_bomb_refused_cheaply():
    """A 400-byte alias bomb (9^9 = 387M expanded nodes) is refused before anything is
    built: well under 100 MB of Python allocations (generous time bound, no timing race)."""
    from atp.errors import GoalListError
    from atp.goals.yamlio import loads_yaml

    assert len(ALIAS_BOMB) < 450
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(GoalListError, match="aliases expand"):
            loads_yaml(ALIAS_BOMB, "bomb.yaml")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 100e6
    assert time.perf_counter() - t0 < 5.0


def test_quote_bounds_any_value():
    from atp.errors import InputError, quote

    big = {"a": ["x" * 10_000] * 10_000}
    q = quote(big)
    assert len(q) <= 80 and q.endswith("\u2026")
    assert len(InputError("y" * 10_000, field="f" * 1000).one_line()) < 800


def test_optimiser_names_a_non_finite_term(plan_template):
    """A goal weight of 1e308 (possible through the API) is refused at build time with the
    goal named, instead of a NaN objective."""
    from dataclasses import replace

    from atp.optimizer.problem import build_problem

    from atp.dose.influence import DoseInfluence
    from atp.errors import InputError
    from atp.goals import with_control_structures
    from atp.pipeline import load_plan

    plan = load_plan(plan_template)
    goals = [replace(g, weight=1e308) if g.id == "Larynx.Dmean" else g
             for g in plan.resolved_goals]
    patient = with_control_structures(plan.patient, goals)
    dij = DoseInfluence.load(plan_template / "dij.npz")
    with pytest.raises(InputError, match="not finite|weight") as ei:
        build_problem(goals, patient, dij)
    assert ei.value.field == "Larynx.Dmean.weight"


def test_set_changes_checked_like_the_goal_list(plan_template):
    from atp.errors import InputError
    from atp.pipeline import apply_settings, load_plan

    goals = load_plan(plan_template).resolved_goals
    for key, value in (("SpinalCord.D0.1cc.value", float("inf")),
                       ("Larynx.Dmean.weight", float("nan")),
                       ("Larynx.Dmean.priority", float("inf")),
                       ("Parotid_R.Dmean.tolerance", 1e400),
                       ("Larynx.Dmean.value", -5.0)):
        with pytest.raises(InputError) as ei:
            apply_settings(goals, {key: value})
        assert key in ei.value.field


def test_mathtext_roi_name_does_not_break_the_report(tmp_path):
    from atp.patient import Patient, Structure
    from atp.phantom import head_neck_phantom
    from atp.report import dvh_figure, plain_label

    ph = head_neck_phantom()
    structures = dict(ph.structures)
    s = structures.pop("Larynx")
    name = "Larynx $x^^2$"
    structures[name] = Structure(name, s.mask, s.role, original_name=name)
    patient = Patient(ph.ct_hu, ph.grid, structures, ph.prescriptions, ph.patient_id,
                      ph.metadata, ph.source)
    dose = np.zeros(ph.grid.shape, np.float32)
    dose[structures[name].mask] = 30.0
    uri = dvh_figure(patient, dose, structures=[name, "PTV_70"])
    assert uri.startswith("data:image/png;base64,")
    assert plain_label(name) == r"Larynx \$x^^2\$"


def test_alias_table_refuses_non_text_aliases(tmp_path):
    """YAML 1.1 reads an unquoted alias ``on`` (optic nerve) as true: refused, naming the
    entry (the shipped table quotes it)."""
    from atp.errors import InputError
    from atp.names import AliasTable, canonical_name

    f = tmp_path / "aliases.yaml"
    f.write_text("lateral:\n  OpticNrv: [optic nerve, on]\n")
    with pytest.raises(InputError) as ei:
        AliasTable.load(f)
    assert ei.value.field == "lateral.OpticNrv" and ei.value.file == str(f)
    assert canonical_name("ON_L") == "OpticNrv_L"
