"""`atp evaluate`, `atp goals show|list`; OpenKBP reference doses vs OpenKBP's definitions."""

import json

import numpy as np
import pytest

from atp.cli import main


@pytest.fixture(scope="module")
def phantom_dose(tmp_path_factory, phantom):
    d = tmp_path_factory.mktemp("dose")
    dose = phantom.prescription_map_gy()
    np.save(d / "dose.npy", dose)
    np.save(d / "pred.npy", dose + 1.0)
    return d


def test_evaluate_phantom_json(capsys, phantom_dose):
    rc = main(["evaluate", "phantom", "--dose", str(phantom_dose / "dose.npy"), "--site", "hn",
               "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    goals = {g["id"]: g for g in out["goals"]}
    assert goals["PTV_70.D95%"]["passed"] is True
    pred = goals["Parotid_L.Dmean.pred"]
    assert pred["passed"] is None and "--predicted" in pred["reason"]
    assert pred["achieved"] is not None
    m = out["metrics"]["PTV_70"]
    assert {"D99%", "D95%", "D1%", "D0.1cc", "Dmean", "Dmax", "CI", "CIpaddick", "HI",
            "GI"} <= set(m)
    assert out["summary"]["all"]["unknown"] >= 1


def test_evaluate_with_prediction_and_institution(capsys, phantom_dose):
    rc = main(["evaluate", "phantom", "--dose", str(phantom_dose / "dose.npy"), "--site", "hn",
               "--institution", "example_parotid_sparing",
               "--predicted-dose", str(phantom_dose / "pred.npy"), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["institution"] == "example_parotid_sparing"
    g = {g["id"]: g for g in out["goals"]}["Parotid_L.Dmean.pred"]
    assert g["tolerance_pct"] == -20 and g["passed"] is not None
    assert g["value"] == pytest.approx(g["predicted_value"] * 0.8)


def test_evaluate_text(capsys, phantom_dose):
    assert main(["evaluate", "phantom", "--dose", str(phantom_dose / "dose.npy"),
                 "--site", "hn"]) == 0
    out = capsys.readouterr().out
    assert "PTV_70.D95%" in out and "pass" in out and "CIpad" in out


def test_evaluate_bad_inputs(capsys, tmp_path, phantom, phantom_dose):
    small = tmp_path / "small.npy"
    np.save(small, np.zeros((4, 4, 4), np.float32))
    assert main(["evaluate", "phantom", "--dose", str(small), "--site", "hn"]) == 2
    err = capsys.readouterr().err
    assert "small.npy" in err and "'shape'" in err and err.count("\n") == 1
    nan = tmp_path / "nan.npy"
    d = phantom.prescription_map_gy()
    d[0, 0, 0] = np.nan
    np.save(nan, d)
    assert main(["evaluate", "phantom", "--dose", str(nan), "--site", "hn"]) == 2
    assert "NaN" in capsys.readouterr().err
    bad = tmp_path / "g.yaml"
    bad.write_text("site: x\ngoals:\n  - {structure: Nosuchorgan, metric: Dmean, "
                   "operator: '<=', value: 3, priority: 3}\n")
    assert main(["evaluate", "phantom", "--dose", str(phantom_dose / "dose.npy"),
                 "--goal-list", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "g.yaml:3" in err and "Nosuchorgan" in err


def test_goals_show_and_list(capsys):
    assert main(["goals", "show", "--site", "hn", "--institution", "example_conservative",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ids = {g["id"]: g for g in out["goals"]}
    assert ids["SpinalCord.D0.1cc"]["value"] == 43 and "Bone_Mandible.D0.1cc" not in ids
    assert out["priority_weights"]["base"] == 20
    assert main(["goals", "show", "--site", "hn"]) == 0
    text = capsys.readouterr().out
    assert "predicted-5%" in text and "RTOG 0615" in text
    assert main(["goals", "list", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert "prostate" in {s["site"] for s in listing["sites"]}
    assert main(["goals", "show", "--site", "breast", "--institution",
                 "example_conservative"]) == 2
    assert "example_conservative.yaml" in capsys.readouterr().err


# --- "Done when": OpenKBP reference dose vs OpenKBP's own percentile definitions ----------
def openkbp_reference_metrics(dose, masks, voxel_mm):
    """OpenKBP's evaluation rule, written out independently of atp.dvh."""
    vox_mm3 = float(np.prod(voxel_mm))
    n01 = max(1, round(100.0 / vox_mm3))
    out = {}
    for name, m in masks.items():
        roi = dose[m]
        if roi.size == 0:
            continue
        out[name] = {"D99%": np.percentile(roi, 1), "D95%": np.percentile(roi, 5),
                     "D1%": np.percentile(roi, 99), "Dmean": roi.mean(),
                     "D0.1cc": np.percentile(roi, 100 - n01 / roi.size * 100)}
    return out


@pytest.mark.shared_data
@pytest.mark.slow
@pytest.mark.parametrize("rel", ["train/pt_1.npz", "validation/pt_201.npz", "csv_sample/pt_2"])
def test_openkbp_reference_dose_matches(rel, openkbp_dir, tmp_path, capsys):
    from atp.io import load_patient

    path = openkbp_dir / rel
    if not path.exists():
        pytest.skip(f"{rel} not present")
    patient = load_patient(path)
    dose = np.asarray(patient.metadata["reference_dose_gy"], dtype=np.float32)
    np.save(tmp_path / "ref.npy", dose)
    assert main(["evaluate", str(path), "--dose", str(tmp_path / "ref.npy"), "--site", "hn",
                 "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["metrics"]
    masks = {n: s.mask for n, s in patient.structures.items() if n != "External"}
    ref = openkbp_reference_metrics(dose.astype(np.float64), masks, patient.grid.spacing_mm)
    assert set(ref) <= set(got)
    for name, row in ref.items():
        for k, v in row.items():
            assert got[name][k] == pytest.approx(v, abs=0.1), (name, k)
