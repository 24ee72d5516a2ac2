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


def test_help_loads_no_stage_scipy_or_pydicom():
    """``atp --help`` (and so every command's start-up) builds every command's parser;
    the stages, scipy and pydicom (seconds together on a loaded machine) load only when a
    command runs: the command modules import them lazily (ARCHITECTURE.md, import rules)."""
    import subprocess
    import sys

    heavy = ("atp.optimizer", "atp.predictor", "atp.sequencer", "scipy", "pydicom", "torch")
    code = ("import sys; from atp.cli import main; rc = main(['--help']); "
            f"print(rc, [m for m in {heavy!r} if m in sys.modules], file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert "usage: atp" in out.stdout
    assert out.stderr.strip() == "0 []", out.stderr
