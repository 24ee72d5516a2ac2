import json

from atp.cli import main


def test_info_json(capsys):
    assert main(["info", "phantom", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    names = {s["name"] for s in info["structures"]}
    assert {"PTV_70", "PTV_56", "SpinalCord", "External"} <= names


def test_missing_patient_exits_2(capsys, tmp_path):
    assert main(["info", str(tmp_path / "nope.npz")]) == 2
    err = capsys.readouterr().err
    assert "nope.npz" in err and err.count("\n") == 1
