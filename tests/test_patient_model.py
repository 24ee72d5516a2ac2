import numpy as np
import pytest

from atp.errors import GridMismatchError, InputError, StructureError
from atp.grid import Grid
from atp.patient import Patient, Prescription, Role, Structure


def small_patient(**kw):
    g = Grid((4, 5, 6), (2.0, 3.0, 4.0), (10.0, -5.0, 3.0))
    ct = np.zeros(g.shape, np.float32)
    m = np.zeros(g.shape, bool)
    m[1:3, 1:3, 1:3] = True
    s = {"PTV_60": Structure("PTV_60", m, Role.TARGET)}
    return Patient(ct, g, s, (Prescription("PTV_60", 60.0, 30),), **kw)


def test_patient_is_immutable():
    p = small_patient()
    with pytest.raises(ValueError):
        p.ct_hu[0, 0, 0] = 5
    with pytest.raises(ValueError):
        p.mask("PTV_60")[0, 0, 0] = True
    with pytest.raises(TypeError):
        p.structures["x"] = None
    with pytest.raises(AttributeError):
        p.patient_id = "other"


def test_index_patient_round_trip_and_volume():
    g = Grid((4, 5, 6), (2.0, 3.0, 4.0), (10.0, -5.0, 3.0),
             direction=np.array([[0, 1, 0], [1, 0, 0], [0, 0, -1.0]]))
    idx = np.array([[0, 0, 0], [1.5, 2.0, 3.25], [3, 4, 5]])
    p = g.index_to_patient(idx)
    assert np.allclose(p[0], [10.0, -5.0, 3.0])
    # axis0 runs along +y with 2 mm, axis1 along +x with 3 mm, axis2 along -z with 4 mm
    assert np.allclose(p[1], [10.0 + 6.0, -5.0 + 3.0, 3.0 - 13.0])
    assert np.allclose(g.patient_to_index(p), idx)
    assert g.voxel_volume_cc == pytest.approx(0.024)
    assert small_patient().structure("PTV_60").volume_cc(g) == pytest.approx(8 * 0.024)


def test_downsampled_grid_centres_blocks():
    g = Grid((4, 4, 4), (1.0, 1.0, 1.0))
    c = g.downsampled(2)
    assert c.shape == (2, 2, 2)
    assert np.allclose(c.index_to_patient([0, 0, 0]), [0.5, 0.5, 0.5])


def test_bad_inputs_raise_named_errors():
    g = Grid((4, 5, 6), (2.0, 3.0, 4.0))
    with pytest.raises(GridMismatchError):
        Patient(np.zeros((4, 5, 7), np.float32), g, {})
    bad = np.zeros(g.shape, np.float32)
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        Patient(bad, g, {})
    with pytest.raises(StructureError, match="empty"):
        Patient(np.zeros(g.shape, np.float32), g,
                {"PTV": Structure("PTV", np.zeros(g.shape, bool), Role.TARGET)},
                (Prescription("PTV", 60, 30),))
    with pytest.raises(StructureError, match="unknown structure"):
        small_patient().mask("Liver")
    with pytest.raises(InputError):
        Prescription("PTV", -1.0, 30)
    with pytest.raises(GridMismatchError):
        Grid((4, 5, 6), (0.0, 1.0, 1.0))


def test_prescription_map_takes_highest_dose(phantom):
    rx = phantom.prescription_map_gy()
    assert rx[phantom.mask("PTV_70")].min() == 70.0
    assert rx[phantom.mask("PTV_56")].max() == 56.0
    assert phantom.targets[0] == "PTV_70"


def test_phantom_is_deterministic_and_realistic(phantom):
    from atp.phantom import head_neck_phantom

    again = head_neck_phantom()
    assert np.array_equal(again.ct_hu, phantom.ct_hu)
    for name in phantom.structures:
        assert np.array_equal(again.mask(name), phantom.mask(name))
        assert phantom.structure(name).n_voxels > 0
    body = phantom.body_mask
    for name in phantom.targets + phantom.organs:
        assert not np.any(phantom.mask(name) & ~body), name
    # the elective target is concave: it wraps around the cord (C shape)
    cord_c = np.argwhere(phantom.mask("SpinalCord")).mean(0)
    ptv_c = np.argwhere(phantom.mask("PTV_56")).mean(0)
    assert np.linalg.norm((cord_c - ptv_c)[1:]) < 8  # centroid close to the cord, outside it
    assert not np.any(phantom.mask("PTV_56") & phantom.mask("SpinalCord"))
