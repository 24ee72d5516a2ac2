"""The one plug-in Registry (atp/registry.py) and the four registries built on it."""

from __future__ import annotations

import json
import sys
from importlib.metadata import EntryPoint

import pytest
from atp.optimizer import registry as backends
from atp.predictor import registry as predictors
from atp.sequencer import registry as sequencers

import atp.registry
from atp.cli import main
from atp.dose import registry as engines
from atp.errors import BackendUnavailableError, InputError
from atp.registry import PluginError, RegistrationError, Registry

VENDOR = '''
class Engine:
    def __init__(self, scale=1.0):
        self.scale = scale

    def solve(self):
        return self.scale

    @classmethod
    def is_installed(cls):
        return True

    name = "vendor"
    # the other kinds' protocols, so one class serves every group in the tests
    influence = aperture_dose = predict = sequence = solve


class NoMethods:
    pass
'''


class Solver:
    name = "solver-a"

    def solve(self):
        return "a"


def _reg(**kw) -> Registry:
    return Registry("widget", "atp.test_widgets", methods=("solve",), attributes=("name",),
                    **kw)


@pytest.fixture
def vendor(tmp_path, monkeypatch):
    """A third-party module on sys.path, and fake entry points for any group."""
    (tmp_path / "atp_vendor_plugin.py").write_text(VENDOR)
    monkeypatch.syspath_prepend(str(tmp_path))
    eps: list[EntryPoint] = []
    monkeypatch.setattr(atp.registry, "entry_points",
                        lambda group: [e for e in eps if e.group == group])
    yield eps
    sys.modules.pop("atp_vendor_plugin", None)


def test_register_forms_and_refusals():
    reg = _reg()
    assert reg.register("a", Solver) is Solver
    reg.register(Solver())  # the name from obj.name: "solver-a"

    @reg.register("made")
    def make():
        return Solver()

    assert reg.names() == ["a", "made", "solver-a"]
    assert reg.get("made").solve() == "a" and isinstance(reg.get("a"), Solver)
    with pytest.raises(RegistrationError, match="already registered"):
        reg.register("a", Solver)
    reg.register("a", Solver(), replace=True)
    for bad_name in ("", "  ", None):
        with pytest.raises(RegistrationError):
            reg.register(bad_name, Solver)
    with pytest.raises(RegistrationError, match="no solve"):
        reg.register("b", type("NoSolve", (), {}))
    with pytest.raises(RegistrationError, match="not a class, a factory"):
        reg.register("b", 42)
    with pytest.raises(RegistrationError, match="module:attr"):
        reg.register("b", "not a target")
    # one error type for the old callers of both kinds: InputError and TypeError
    assert issubclass(RegistrationError, InputError) and issubclass(RegistrationError, TypeError)
    reg.unregister("a")
    assert "a" not in reg


def test_lazy_target_imported_on_first_use(vendor):
    reg = _reg(builtins={"vendor": "atp_vendor_plugin:Engine"})
    assert reg.names() == ["vendor"] and "atp_vendor_plugin" not in sys.modules
    assert reg.get("vendor", scale=2.0).solve() == 2.0
    assert "atp_vendor_plugin" in sys.modules
    with pytest.raises(InputError, match="bad options for widget 'vendor'"):
        reg.get("vendor", colour="red")


def test_get_accepts_dict_class_instance_and_refuses_others():
    reg = _reg(builtins={"a": Solver})
    inst = Solver()
    assert reg.get(inst) is inst
    assert isinstance(reg.get(Solver), Solver) and isinstance(reg.get({"name": "a"}), Solver)
    with pytest.raises(InputError, match="needs a 'name'"):
        reg.get({"colour": 1})
    with pytest.raises(InputError, match="not a widget"):
        reg.get(3.5)
    with pytest.raises(BackendUnavailableError, match=r"widget 'b' is not installed; known: a.*"
                                                      r"'atp.test_widgets' entry-point"):
        reg.get("b")
    reg.register("bad-factory", lambda: object())
    with pytest.raises(PluginError, match="'bad-factory' is broken: it returned object"):
        reg.get("bad-factory")


def test_broken_entry_points_one_policy(vendor):
    group = "atp.test_widgets"
    vendor += [EntryPoint("good", "atp_vendor_plugin:Engine", group),
               EntryPoint("missing", "no_such_vendor_pkg.mod:Thing", group),
               EntryPoint("no-methods", "atp_vendor_plugin:NoMethods", group),
               EntryPoint("a", "atp_vendor_plugin:Engine", group)]  # taken by a built-in
    reg = _reg(builtins={"a": Solver})
    # every name is listed, broken ones included; the good ones still work
    assert reg.names() == ["a", "good", "missing", "no-methods"]
    assert reg.get("good").solve() == 1.0 and reg.get("a").solve() == "a"
    with pytest.raises(PluginError) as exc:
        reg.get("missing")
    msg = str(exc.value)
    assert "entry point atp.test_widgets" in msg and "no_such_vendor_pkg.mod:Thing" in msg
    assert "ModuleNotFoundError" in msg and "\n" not in msg
    with pytest.raises(PluginError, match="NoMethods has no solve"):
        reg.get("no-methods")
    rows = {(r.name, r.origin.split()[0]): r for r in reg.listing()}
    assert rows[("good", "entry")].error is None
    assert rows[("missing", "entry")].broken
    assert "No module named 'no_such_vendor_pkg'" in rows[("missing", "entry")].error
    assert rows[("no-methods", "entry")].broken
    assert "taken by the built-in" in rows[("a", "entry")].error
    assert rows[("a", "built-in")].error is None
    vendor.clear()
    reg.refresh()
    assert reg.names() == ["a"]


@pytest.mark.parametrize("module,reg,kind", [
    (engines, engines.ENGINES, "engines"), (predictors, predictors.PREDICTORS, "predictors"),
    (backends, backends.BACKENDS, "backends"), (sequencers, sequencers.SEQUENCERS,
                                                "sequencers")])
def test_each_stage_registry_and_atp_list_show_broken_plugins(module, reg, kind, vendor,
                                                              capsys):
    assert reg.group == module.ENTRY_POINT_GROUP
    assert reg.group == {"engines": "atp.dose_engines", "predictors": "atp.predictors",
                         "backends": "atp.backends", "sequencers": "atp.sequencers"}[kind]
    vendor += [EntryPoint("vendor-ok", "atp_vendor_plugin:Engine", reg.group),
               EntryPoint("vendor-broken", "no_such_vendor_pkg:Thing", reg.group)]
    reg.refresh()
    try:
        assert main(["list", kind, "--json"]) == 0
        rows = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
        assert rows["vendor-ok"]["available"] and "entry point" in rows["vendor-ok"]["detail"]
        broken = rows["vendor-broken"]
        assert not broken["available"] and not broken["default"]
        assert broken["detail"].startswith("broken (no_such_vendor_pkg:Thing)")
        assert "No module named 'no_such_vendor_pkg'" in broken["detail"]
        assert main(["list", kind]) == 0
        line = next(s for s in capsys.readouterr().out.splitlines() if "vendor-broken" in s)
        assert "[broken]" in line and "no_such_vendor_pkg" in line
        with pytest.raises(PluginError, match="vendor-broken.*no_such_vendor_pkg:Thing"):
            module.get("vendor-broken")
    finally:
        vendor.clear()
        reg.refresh()
    assert "vendor-broken" not in reg.names()
