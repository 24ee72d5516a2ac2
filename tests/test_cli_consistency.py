"""One option name per concept across commands (old names kept as hidden aliases), `atp
list`, institution overlays found on ATP_CONFIG_PATH / the user config folder, and `atp
goals show` marking what an overlay changed."""

from __future__ import annotations

import inspect
import json
import textwrap

import pytest

from atp.cli import build_parser, main


def _sub(name):
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return parser, action.choices[name]


@pytest.mark.parametrize("argv, dest, value, old", [
    (["predict", "phantom", "--model", "baseline", "--out", "p.npy"], "predictor",
     "baseline", "--model"),
    (["dij", "phantom", "--engine", "pencil-beam", "--out", "d.npz"], "dose_engine",
     "pencil-beam", "--engine"),
    (["evaluate", "phantom", "--dose", "d.npy", "--predicted", "p.npy"], "predicted_dose",
     "p.npy", "--predicted"),
    (["commission", "--model", "m.json"], "beam_model", "m.json", "--model"),
])
def test_old_option_names_are_hidden_aliases(argv, dest, value, old, capsys):
    parser, sub = _sub(argv[0])
    args = parser.parse_args(argv)
    assert getattr(args, dest) == value
    assert f"{old} is deprecated" in capsys.readouterr().err
    help_text = sub.format_help()
    assert f"{old} " not in help_text and f"{old}\n" not in help_text
    new = "--" + dest.replace("_", "-")
    assert new in help_text
    # the new name gives the same result, without a note
    args = parser.parse_args([new if a == old else a for a in argv])
    assert getattr(args, dest) == value and capsys.readouterr().err == ""


def test_same_option_names_across_commands():
    parser = build_parser()
    cmds = next(a for a in parser._actions if a.dest == "command").choices
    opts = {name: {o for a in p._actions for o in a.option_strings if a.help != "==SUPPRESS=="}
            for name, p in cmds.items() if hasattr(p, "_actions")}
    for name in ("plan", "predict", "demo"):
        assert "--predictor" in opts[name]
    for name in ("plan", "dij"):
        assert "--dose-engine" in opts[name]
    for name in ("plan", "evaluate"):
        assert "--predicted-dose" in opts[name]
    assert "--model" not in opts["predict"] and "--engine" not in opts["dij"]


def test_device_names_match(tmp_path):
    parser = build_parser()
    assert parser.parse_args(["dij", "phantom", "--device", "cuda", "--out", "d.npz"]).device \
        == "cuda"
    assert parser.parse_args(["dij", "phantom", "--device", "gpu", "--out", "d.npz"]).device \
        == "gpu"  # the old value, still accepted
    plan_dev = next(a for a in _sub("plan")[1]._actions if a.dest == "device")
    assert "cuda" in plan_dev.metavar


def test_site_defaults_to_hn_everywhere(capsys):
    assert main(["goals", "show"]) == 0
    assert capsys.readouterr().out.startswith("goal list 'hn'")
    parser = build_parser()
    for argv in (["evaluate", "phantom", "--dose", "d.npy"], ["goals", "show"],
                 ["plan", "phantom", "--out", "x"]):
        args = parser.parse_args(argv)
        assert args.site is None and args.goal_list is None  # -> DEFAULT_SITE at run time


def test_replan_warm_default_matches_the_api():
    from atp.pipeline import replan

    api = inspect.signature(replan).parameters["warm"].default
    parser = build_parser()
    assert parser.parse_args(["replan", "p"]).warm is api
    assert parser.parse_args(["replan", "p", "--cold"]).warm is False
    assert parser.parse_args(["replan", "p", "--warm"]).warm is True


@pytest.fixture
def isolated_config(tmp_path, monkeypatch):
    """No user overlays and no ATP_CONFIG_PATH unless a test sets them."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("ATP_CONFIG_PATH", raising=False)
    return tmp_path


@pytest.mark.parametrize("kind", ["predictors", "engines", "backends", "sequencers",
                                  "machines", "templates", "sites", "institutions"])
def test_atp_list(kind, capsys, isolated_config):
    assert main(["list", kind, "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    names = {e["name"] for e in entries}
    expected = {"predictors": {"baseline"}, "engines": {"pencil-beam"},
                "backends": {"auto", "cpu", "qp"}, "sequencers": {"vmat", "imrt-sliding"},
                "machines": {"millennium120", "hd120"}, "templates": {"hn_9field"},
                "sites": {"hn", "prostate"},
                "institutions": {"example_conservative", "example_parotid_sparing"}}[kind]
    assert expected <= names
    assert sum(e["default"] for e in entries) <= 1
    assert main(["list", kind]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{kind} (--") and all(n in out for n in expected)


def test_atp_list_all_and_bad_kind(capsys, isolated_config):
    assert main(["list", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) >= {"predictors", "institutions"}
    assert main(["list", "colours"]) == 2  # argparse's error: one line, exit 2


def _overlay(folder, name, cord_limit):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""\
        institution: {name}
        sites:
          hn:
            modify:
              - goal: SpinalCord.D0.1cc
                set: {{value: {cord_limit}}}
            add:
              - {{structure: Cavity_Oral, metric: Dmean, operator: "<=", value: 40,
                 priority: 4, note: our clinic}}
        """))
    return path


def test_institution_found_on_atp_config_path(isolated_config, monkeypatch, capsys):
    from atp.goals.loader import list_institutions, load_goal_list

    first = _overlay(isolated_config / "a", "my_clinic", 42)
    _overlay(isolated_config / "b" / "site_configs", "my_clinic", 41)  # hidden by a/
    shadow = _overlay(isolated_config / "b" / "site_configs", "example_conservative", 40)
    monkeypatch.setenv("ATP_CONFIG_PATH", f"{isolated_config / 'a'}:{isolated_config / 'b'}")
    gl = load_goal_list(site="hn", institution="my_clinic")
    assert gl.institution == "my_clinic" and gl.overlay_file == str(first)
    assert gl.goal("SpinalCord.D0.1cc").value == 42
    assert {"my_clinic", "example_parotid_sparing"} <= set(list_institutions())
    # an overlay on the path hides a shipped one of the same name
    assert load_goal_list(site="hn", institution="example_conservative").overlay_file \
        == str(shadow)
    assert main(["list", "institutions"]) == 0
    assert str(first) in capsys.readouterr().out


def test_institution_found_in_user_config_dir(isolated_config, capsys):
    from atp.goals.loader import load_goal_list, user_config_dir

    assert user_config_dir() == isolated_config / "xdg" / "atp" / "site_configs"
    _overlay(user_config_dir(), "home_clinic", 44)
    assert load_goal_list(site="hn", institution="home_clinic").goal(
        "SpinalCord.D0.1cc").value == 44
    assert main(["goals", "show", "--institution", "nowhere"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "home_clinic" in err and "ATP_CONFIG_PATH" in err and str(user_config_dir()) in err


def test_goals_show_marks_overlay_changes(isolated_config, monkeypatch, capsys):
    path = _overlay(isolated_config / "c", "my_clinic", 42)
    monkeypatch.setenv("ATP_CONFIG_PATH", str(isolated_config / "c"))
    assert main(["goals", "show", "--institution", "my_clinic"]) == 0
    lines = capsys.readouterr().out.splitlines()
    cord = next(ln for ln in lines if "SpinalCord.D0.1cc " in ln)
    assert cord.startswith("*") and f"{path}:5" in cord and "value" in cord
    added = next(ln for ln in lines if "Cavity_Oral.Dmean" in ln)
    assert added.startswith("+") and f"{path}:8" in added
    plain = next(ln for ln in lines if "Brainstem.D0.1cc " in ln)
    assert plain.startswith(" ") and "overlay" not in plain
    assert main(["goals", "show", "--institution", "my_clinic", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    by_id = {g["id"]: g for g in data["goals"]}
    assert by_id["SpinalCord.D0.1cc"]["overlay_change"]["line"] == 5
    assert by_id["Cavity_Oral.Dmean"]["overlay_change"]["change"] == "added"
    assert by_id["Brainstem.D0.1cc"]["overlay_change"] is None
    # removals are listed too (shipped example)
    assert main(["goals", "show", "--institution", "example_conservative"]) == 0
    out = capsys.readouterr().out
    assert "Bone_Mandible.D0.1cc" in out and "removed by overlay" in out
