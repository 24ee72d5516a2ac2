import numpy as np
import pytest

from atp.errors import InputError
from atp.io import load_patient
from atp.io.openkbp import load_openkbp_csv, load_openkbp_npz


def test_npz_import_roles_and_rx(openkbp_pt1):
    p = openkbp_pt1
    assert p.grid.shape == (128, 128, 128)
    assert [rx.target for rx in p.prescriptions] == ["PTV_70", "PTV_63", "PTV_56"]
    assert all(rx.fractions == 35 for rx in p.prescriptions)
    assert p.structure("External").role.value == "external"
    assert p.structure("Parotid_L").original_name == "LeftParotid"
    assert p.ct_hu.min() >= -1024 and p.ct_hu.dtype == np.float32
    # anatomy orientation: left parotid at +x, brainstem superior of the cord
    assert p.target_centroid_mm("Parotid_L")[0] > p.target_centroid_mm("Parotid_R")[0]
    assert p.target_centroid_mm("Brainstem")[2] > p.target_centroid_mm("SpinalCord")[2]


def test_csv_layout_matches_npz(openkbp_dir, openkbp_pt1):
    q = load_openkbp_csv(openkbp_dir / "csv_sample" / "pt_1")
    assert np.array_equal(q.ct_hu, openkbp_pt1.ct_hu)
    assert sorted(q.structures) == sorted(openkbp_pt1.structures)
    for n in q.structures:
        assert np.array_equal(q.mask(n), openkbp_pt1.mask(n))
    assert np.allclose(q.metadata["reference_dose_gy"], openkbp_pt1.metadata["reference_dose_gy"])


def test_loader_dispatch(openkbp_dir, tmp_path):
    assert load_patient("phantom").patient_id == "atp-phantom-hn"
    assert load_patient(openkbp_dir / "csv_sample" / "pt_2").patient_id == "pt_2"
    with pytest.raises(InputError, match="no such file"):
        load_patient(tmp_path / "missing.npz")


def test_corrupt_npz_and_csv(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(InputError, match="bad.npz"):
        load_openkbp_npz(bad)
    folder = tmp_path / "pt_9"
    folder.mkdir()
    (folder / "ct.csv").write_text(",data\n5,abc\n")
    (folder / "voxel_dimensions.csv").write_text("3.9\n3.9\n2.5\n")
    with pytest.raises(InputError, match="ct.csv"):
        load_openkbp_csv(folder)
    np.savez(tmp_path / "nomask.npz", ct=np.zeros((128,) * 3, np.uint16))
    with pytest.raises(InputError, match="masks"):
        load_openkbp_npz(tmp_path / "nomask.npz")
