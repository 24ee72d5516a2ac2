"""DoseInfluence round trip, resampling between grids, matRad import, registry, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp

from atp.cli import main
from atp.dose import registry
from atp.dose.external import import_dij
from atp.dose.geometry import Beam
from atp.dose.influence import DoseInfluence
from atp.dose.pencil_beam import PencilBeamEngine
from atp.dose.resample import dose_to_patient_grid, mask_to_dose_grid
from atp.errors import BackendUnavailableError, GridMismatchError, InputError
from atp.grid import Grid


@pytest.fixture(scope="module")
def small_dij(phantom):
    return PencilBeamEngine().influence(phantom, [Beam(30), Beam(250)], dose_grid_factor=2)


def test_npz_roundtrip_exact(small_dij, tmp_path):
    f = tmp_path / "d.npz"
    small_dij.save(f)
    back = DoseInfluence.load(f)
    a, b = small_dij.matrix, back.matrix
    assert a.shape == b.shape and (a != b).nnz == 0
    np.testing.assert_array_equal(a.data, b.data)
    for name in ("beam_index", "gantry_deg", "collimator_deg", "couch_deg", "isocenter_mm",
                 "bev_x_mm", "bev_y_mm"):
        np.testing.assert_array_equal(getattr(small_dij.beamlets, name),
                                      getattr(back.beamlets, name))
    assert back.dose_grid.same_as(small_dij.dose_grid, tol_mm=0)
    assert back.patient_grid.same_as(small_dij.patient_grid, tol_mm=0)
    assert back.meta["engine"] == "pencil-beam"


def test_npz_stores_the_values_plain_and_deflates_the_rest(small_dij, tmp_path):
    """The matrix values (float32 noise in the mantissa) are stored, the indices and small
    arrays deflated; numpy reads the file as any .npz."""
    import zipfile

    f = tmp_path / "d.npz"
    small_dij.save(f)
    kinds = {i.filename: i.compress_type for i in zipfile.ZipFile(f).infolist()}
    assert kinds["data.npy"] == zipfile.ZIP_STORED
    assert kinds["indices.npy"] == zipfile.ZIP_DEFLATED
    assert kinds["meta_json.npy"] == zipfile.ZIP_DEFLATED
    with np.load(f, allow_pickle=False) as z:
        np.testing.assert_array_equal(z["indices"], small_dij.matrix.indices)


def test_csr_is_the_matrix_converted_once(small_dij):
    csr = small_dij.csr
    assert sp.isspmatrix_csr(csr) and csr.has_sorted_indices and csr.dtype == np.float32
    assert csr.shape == small_dij.matrix.shape and (csr != small_dij.matrix).nnz == 0
    assert small_dij.csr is csr  # kept with the dij: later plans skip the conversion


def test_mask_to_dose_grid_exact():
    g = Grid((5, 4, 3), (2.0, 2.0, 2.0), (1.0, 2.0, 3.0))
    dg = g.downsampled(2)
    m = np.zeros(g.shape, bool)
    m[0, 0, 0] = m[1, 1, 1] = m[4, 3, 2] = True
    f = mask_to_dose_grid(m, g, dg)
    assert f.dtype == np.float32 and f.shape == (3, 2, 2)
    assert f[0, 0, 0] == pytest.approx(2 / 8) and f[2, 1, 1] == pytest.approx(1 / 8)
    assert f.sum() == pytest.approx(3 / 8)
    with pytest.raises(GridMismatchError):
        mask_to_dose_grid(m, g, Grid((3, 2, 2), (3.0, 3.0, 3.0)))


def test_dose_to_patient_grid_trilinear():
    g = Grid((8, 6, 4), (1.0, 2.0, 3.0), (0.0, 0.0, 0.0))
    dg = g.downsampled(2)
    # a linear function is reproduced exactly inside the dose-grid hull
    c = dg.voxel_centres_mm().reshape(*dg.shape, 3)
    lin = (1.0 + 0.5 * c[..., 0] - 0.25 * c[..., 1] + 0.1 * c[..., 2]).astype(np.float32)
    up = dose_to_patient_grid(lin, dg, g)
    assert up.shape == g.shape and up.dtype == np.float32
    p = g.voxel_centres_mm().reshape(*g.shape, 3)
    expect = 1.0 + 0.5 * p[..., 0] - 0.25 * p[..., 1] + 0.1 * p[..., 2]
    inner = (slice(1, -1),) * 3
    np.testing.assert_allclose(up[inner], expect[inner], rtol=1e-5)
    np.testing.assert_array_equal(dose_to_patient_grid(lin, dg, dg), lin)


def _write_matrad(path, n_vox_dims=(4, 5, 3), n_bix=6, with_stf=True):
    from scipy.io import savemat

    ny, nx, nz = n_vox_dims
    rng = np.random.default_rng(1)
    m = sp.random(ny * nx * nz, n_bix, density=0.3, random_state=rng, format="csc")
    dose_grid = {"dimensions": np.array([ny, nx, nz], float),
                 "resolution": {"x": 3.0, "y": 2.0, "z": 2.5},
                 "x": 10.0 + 3.0 * np.arange(nx), "y": -5.0 + 2.0 * np.arange(ny),
                 "z": 1.0 + 2.5 * np.arange(nz)}
    pd = np.empty((1,), dtype=object)
    pd[0] = m
    dij = {"physicalDose": pd, "doseGrid": dose_grid, "numOfBeams": 2.0,
           "beamNum": np.array([1, 1, 1, 2, 2, 2], float)}
    data = {"dij": dij}
    if with_stf:
        rays = lambda xs: np.array([{"rayPos_bev": np.array([x, 0.0, -x])} for x in xs],
                                   dtype=object)
        data["stf"] = np.array([
            {"gantryAngle": 0.0, "couchAngle": 0.0, "isoCenter": np.array([1.0, 2.0, 3.0]),
             "bixelWidth": 5.0, "ray": rays([-5.0, 0.0, 5.0])},
            {"gantryAngle": 180.0, "couchAngle": 0.0, "isoCenter": np.array([1.0, 2.0, 3.0]),
             "bixelWidth": 5.0, "ray": rays([-2.5, 2.5, 7.5])}], dtype=object)
    savemat(path, data)
    return m


def test_import_matrad(tmp_path):
    f = tmp_path / "dij.mat"
    m = _write_matrad(f)
    dij = import_dij("matrad", f)
    assert dij.matrix.shape == m.shape
    np.testing.assert_allclose(dij.matrix.toarray(), m.toarray().astype(np.float32))
    # matRad linear index (iy, ix, iz), column-major over [Ny Nx Nz] -> the same point
    ny, nx, _nz = 4, 5, 3
    iy, ix, iz = 2, 3, 1
    lin = iy + ny * (ix + nx * iz)
    idx = np.unravel_index(lin, dij.dose_grid.shape)
    np.testing.assert_allclose(dij.dose_grid.index_to_patient(np.array(idx, float)),
                               [10.0 + 3.0 * ix, -5.0 + 2.0 * iy, 1.0 + 2.5 * iz])
    np.testing.assert_array_equal(dij.beamlets.beam_index, [0, 0, 0, 1, 1, 1])
    np.testing.assert_allclose(dij.beamlets.gantry_deg, [0.0, 180.0])
    np.testing.assert_allclose(dij.beamlets.bev_x_mm, [-5, 0, 5, -2.5, 2.5, 7.5])
    assert dij.meta["beam_geometry"] == "matRad stf"


def test_import_matrad_errors(tmp_path):
    f = tmp_path / "nodij.mat"
    from scipy.io import savemat

    savemat(f, {"x": 1.0})
    with pytest.raises(InputError, match="dij"):
        import_dij("matrad", f)
    with pytest.raises(InputError, match="format"):
        import_dij("eclipse", f)


def test_registry():
    assert "pencil-beam" in registry.available()
    e = registry.get("pencil-beam")
    assert isinstance(e, PencilBeamEngine)
    assert registry.get(e) is e
    assert registry.get({"name": "pencil-beam", "ray_spacing_mm": 3.0}).ray_spacing_mm == 3.0
    with pytest.raises(BackendUnavailableError, match="pencil-beam"):
        registry.get("monte-carlo")
    with pytest.raises(TypeError):
        registry.register("bad", object)


def test_cli_dij_and_import(tmp_path, capsys):
    out = tmp_path / "dij.npz"
    rc = main(["dij", "phantom", "--beam-angles", "0,120", "--out", str(out), "--json"])
    assert rc == 0
    info = json.loads(capsys.readouterr().out)
    assert info["beams"] == 2 and info["beamlets"] > 0
    assert DoseInfluence.load(out).n_beamlets == info["beamlets"]
    mat = tmp_path / "m.mat"
    _write_matrad(mat)
    rc = main(["dij", "--import", "matrad", str(mat), "--out", str(tmp_path / "m.npz"),
               "--quiet"])
    assert rc == 0 and (tmp_path / "m.npz").is_file()
    rc = main(["dij", "phantom", "--beam-angles", "0,361", "--out", str(tmp_path / "x.npz")])
    assert rc == 2
    assert "gantry_deg" in capsys.readouterr().err


def test_cli_commission(capsys):
    assert main(["commission", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert {r["depth_cm"] for r in res["pdd"]} == {1.5, 5.0, 10.0, 20.0}
    assert res["reference_penumbra_80_20_mm_at_10cm"] is not None
