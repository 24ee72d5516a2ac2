"""atp never loses a user's files: outputs are checked before the work, replace only
folders atp wrote, leave no litter, survive concurrent writers and honour the umask; the
CLI turns unexpected errors into one line + a traceback file, and a closed pipe into a
quiet exit (issue 19)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import atp
from atp.cli import main
from atp.errors import OutputError
from atp.outputs import MARKER, atomic_output_dir, check_output_dir, clean_stale

REPO = Path(__file__).resolve().parents[1]
CHEAP = ["--predictor", "baseline", "--backend", "cpu", "--max-iter", "30", "--no-sequence",
         "--no-report", "--quiet"]
TOY_BEAMS = 3  # conftest.py's toy dij, with 3 beams


@pytest.fixture(scope="module")
def cheap_plan(phantom, toy):
    return atp.plan(phantom, site="hn", predictor="baseline", dij=toy, backend="cpu",
                    progress=False, optimizer_options={"max_iter": 30}, sequence=False)


@pytest.fixture
def toy_file(toy, tmp_path_factory):
    f = tmp_path_factory.mktemp("dij") / "toy.npz"
    if not f.exists():
        toy.save(f)
    return f


def _snapshot(root: Path) -> dict:
    """Every path under root with its bytes (files) or None (folders)."""
    snap = {}
    for p in sorted(root.rglob("*")):
        snap[p.relative_to(root).as_posix()] = p.read_bytes() if p.is_file() else None
    return snap


def _one_line_naming(err: str, path) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert str(Path(path).resolve()) in lines[0] or str(path) in lines[0], err
    assert "Traceback" not in err


def _no_work(monkeypatch):
    """Make every heavy stage fail loudly: a refusal must come before any of them."""
    def boom(*a, **k):
        raise AssertionError("work started before the output was checked")

    import atp.commands.plan
    import atp.commands.predict
    import atp.commands.train  # noqa: F401 - bind their imports before patching

    for target in ("atp.pipeline.plan", "atp.pipeline.load_plan",
                   "atp.commands.common.load_patient_from_args",
                   "atp.commands.plan.load_patient_from_args",
                   "atp.commands.predict.load_patient_from_args",
                   "atp.phantom.head_neck_phantom", "atp.commands.train._run"):
        monkeypatch.setattr(target, boom)


def _litter(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# --- refusals before any work --------------------------------------------------------------
@pytest.fixture
def user_folder(tmp_path):
    d = tmp_path / "thesis"
    d.mkdir()
    (d / "thesis.txt").write_text("four years of work\n")
    return d


def _commands(out, src_plan):
    return {
        "plan": ["plan", "phantom", "--out", str(out)],
        "plan --fast": ["plan", "phantom", "--fast", "--out", str(out)],
        "replan": ["replan", str(src_plan), "--out", str(out)],
        "demo": ["demo", "--out", str(out)],
        "train": ["train", "--model", "cadunet", "--data", str(src_plan), "--out", str(out)],
    }


@pytest.mark.parametrize("command", ["plan", "plan --fast", "replan", "demo", "train"])
def test_folder_with_a_user_file_is_refused(command, user_folder, tmp_path, cheap_plan,
                                            monkeypatch, capsys):
    src = cheap_plan.save(tmp_path / "src", report=False)
    before = _snapshot(tmp_path)
    _no_work(monkeypatch)
    rc = main(_commands(user_folder, src)[command])
    err = capsys.readouterr().err
    assert rc == 2
    _one_line_naming(err, user_folder)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["plan", "replan", "demo", "train"])
def test_working_folder_is_refused(command, tmp_path, cheap_plan, monkeypatch, capsys):
    src = cheap_plan.save(tmp_path / "src", report=False)
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    before = _snapshot(tmp_path)
    _no_work(monkeypatch)
    rc = main(_commands(".", src)[command])
    err = capsys.readouterr().err
    assert rc == 2
    _one_line_naming(err, work)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["plan", "replan", "demo", "train"])
def test_a_file_as_out_folder_is_refused(command, tmp_path, cheap_plan, monkeypatch,
                                         capsys):
    src = cheap_plan.save(tmp_path / "src", report=False)
    f = tmp_path / "results.txt"
    f.write_text("keep me")
    before = _snapshot(tmp_path)
    _no_work(monkeypatch)
    rc = main(_commands(f, src)[command])
    err = capsys.readouterr().err
    assert rc == 2
    _one_line_naming(err, f)
    assert "is a file" in err
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("command,name", [("dij", "user.npz"), ("predict", "user.npy")])
def test_single_file_outputs_refuse_foreign_files_and_folders(command, name, tmp_path,
                                                              monkeypatch, capsys):
    f = tmp_path / name
    np.savez(f, x=np.arange(3)) if name.endswith(".npz") else np.save(f, np.arange(3))
    d = tmp_path / ("folder.npz" if command == "dij" else "folder.npy")
    d.mkdir()
    before = _snapshot(tmp_path)
    _no_work(monkeypatch)
    for out in (f, d):
        argv = ([command, "phantom", "--beam-angles", "0", "--out", str(out)]
                if command == "dij" else [command, "phantom", "--out", str(out)])
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2
        _one_line_naming(err, out)
    assert _snapshot(tmp_path) == before


def test_single_files_atp_wrote_may_be_replaced(tmp_path, toy):
    from atp.commands.dij import is_dij_file
    from atp.outputs import check_output_file, is_npy_dose

    toy.save(tmp_path / "d.npz")
    assert check_output_file(tmp_path / "d.npz", recognise=is_dij_file) == tmp_path / "d.npz"
    np.save(tmp_path / "p.npy", np.zeros((2, 3, 4), np.float32))
    assert check_output_file(tmp_path / "p.npy", recognise=is_npy_dose)
    np.save(tmp_path / "q.npy", np.zeros((2, 3), np.float64))  # not what predict writes
    (tmp_path / "r.npz").write_bytes(b"not a zip")
    for f, fn in (("q.npy", is_npy_dose), ("r.npz", is_dij_file)):
        with pytest.raises(OutputError, match="atp does not overwrite it"):
            check_output_file(tmp_path / f, recognise=fn)


def test_plan_save_api_refuses_a_user_folder(cheap_plan, user_folder):
    before = _snapshot(user_folder)
    with pytest.raises(OutputError, match="not written by atp"):
        cheap_plan.save(user_folder)
    assert _snapshot(user_folder) == before
    assert _litter(user_folder.parent) == []


def test_atp_folder_with_an_added_user_file_is_refused(cheap_plan, tmp_path):
    out = cheap_plan.save(tmp_path / "p", report=False)
    (out / "my_notes.txt").write_text("do not lose")
    with pytest.raises(OutputError, match="my_notes.txt"):
        cheap_plan.save(out, report=False)
    assert (out / "my_notes.txt").read_text() == "do not lose"


def test_own_folders_are_replaced_old_and_new(cheap_plan, tmp_path):
    out = cheap_plan.save(tmp_path / "p", report=False)
    marker = json.loads((out / MARKER).read_text())
    assert marker["writer"] == "atp" and "plan.json" in marker["entries"]
    cheap_plan.save(out, report=False)  # a plan folder atp wrote: replaced
    # a plan folder of an older atp (no marker): recognised by its plan.json
    (out / MARKER).unlink()
    cheap_plan.save(out, report=False)
    assert (out / MARKER).is_file()
    # an empty folder holds nothing to lose
    empty = tmp_path / "empty"
    empty.mkdir()
    cheap_plan.save(empty, report=False)
    assert (empty / "plan.json").is_file()
    assert _litter(tmp_path) == []


# --- the output location --------------------------------------------------------------------
@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into read-only folders")
def test_read_only_parent_fails_fast(tmp_path, monkeypatch, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        _no_work(monkeypatch)
        rc = main(["plan", "phantom", "--out", str(ro / "p")])
        err = capsys.readouterr().err
        assert rc == 2
        _one_line_naming(err, ro)
        assert "not writable" in err
    finally:
        ro.chmod(0o755)


def test_unwritable_parent_fails_fast_even_as_root(tmp_path, monkeypatch, capsys):
    """The same refusal where the test runs as root (who may write anywhere): the
    permission answer is simulated."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == ro
                        else real(p, mode, **k))
    _no_work(monkeypatch)
    for argv in (["plan", "phantom", "--out", str(ro / "p")],
                 ["replan", str(tmp_path / "src"), "--out", str(ro / "p")],
                 ["predict", "phantom", "--out", str(ro / "x.npy")]):
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and "not writable" in err
        _one_line_naming(err, ro)
    assert list(ro.iterdir()) == []


def test_read_only_file_system_fails_fast(tmp_path, monkeypatch, capsys):
    real = os.statvfs

    class RO:
        def __init__(self, st):
            self.f_bavail, self.f_frsize = st.f_bavail, st.f_frsize
            self.f_flag = st.f_flag | getattr(os, "ST_RDONLY", 1)

    monkeypatch.setattr(os, "statvfs", lambda p: RO(real(p)))
    _no_work(monkeypatch)
    rc = main(["plan", "phantom", "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert rc == 2 and "read-only file system" in err
    _one_line_naming(err, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_missing_parent_under_a_file_fails_fast_else_is_created(tmp_path, toy_file,
                                                                monkeypatch, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    with monkeypatch.context() as m:
        _no_work(m)
        rc = main(["plan", "phantom", "--out", str(f / "sub" / "p")])
        err = capsys.readouterr().err
        assert rc == 2 and "not a folder" in err
        _one_line_naming(err, f)
    out = tmp_path / "plans" / "pt" / "p"
    rc = main(["plan", "phantom", "--dij", str(toy_file), *CHEAP, "--out", str(out)])
    assert rc in (0, 3)
    assert (out / "plan.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "plans"]


def test_full_disk_fails_fast(tmp_path, monkeypatch, capsys):
    real = os.statvfs

    class Full:
        def __init__(self, st):
            self.f_bavail, self.f_frsize, self.f_flag = 3, st.f_frsize, st.f_flag

    monkeypatch.setattr(os, "statvfs", lambda p: Full(real(p)))
    _no_work(monkeypatch)
    rc = main(["plan", "phantom", "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err
    assert rc == 2 and "free" in err
    _one_line_naming(err, tmp_path / "p")
    rc = main(["dij", "phantom", "--out", str(tmp_path / "d.npz")])
    assert rc == 2 and "free" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_disk_full_during_the_save_is_one_line_and_leaves_nothing(cheap_plan, tmp_path,
                                                                  toy_file, monkeypatch,
                                                                  capsys):
    from atp.dose.influence import DoseInfluence

    old = cheap_plan.save(tmp_path / "p", report=False)
    before = _snapshot(tmp_path)

    def full(self, path):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(DoseInfluence, "save", full)
    with pytest.raises(OutputError, match="No space left"):
        cheap_plan.save(old, report=False)
    assert _snapshot(tmp_path) == before  # the previous plan is intact, no litter
    rc = main(["plan", "phantom", "--dij", str(toy_file), *CHEAP, "--out",
               str(tmp_path / "new")])
    err = capsys.readouterr().err
    assert rc == 2
    _one_line_naming(err, tmp_path / "new")
    assert _snapshot(tmp_path) == before


def _run_limited(argv, limit_bytes, cwd):
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, "-m", "atp.cli", *argv], check=False, cwd=cwd,
                          preexec_fn=limit, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX resource limits")
def test_ulimit_f_fails_fast_or_cleanly(tmp_path):
    # below what a plan folder needs: refused before the work
    r = _run_limited(["plan", "phantom", "--out", str(tmp_path / "p")], 2**20, tmp_path)
    assert r.returncode == 2, r.stderr
    assert "ulimit -f" in r.stderr
    _one_line_naming(r.stderr, tmp_path / "p")
    # enough for the check, too little for the dij (2.4 MB): one line, nothing left
    r = _run_limited(["dij", "phantom", "--beam-angles", "0", "--quiet", "--out",
                      str(tmp_path / "d.npz")], 3 * 2**19, tmp_path)
    assert r.returncode == 2, r.stderr
    assert "File too large" in r.stderr
    _one_line_naming(r.stderr, tmp_path / "d.npz")
    assert list(tmp_path.iterdir()) == []


# --- litter, concurrency, modes ---------------------------------------------------------------
def _dead_pid() -> int:
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                       capture_output=True, text=True, check=True)
    return int(p.stdout)


def test_stale_temporaries_of_dead_processes_are_cleaned(cheap_plan, tmp_path):
    dead = _dead_pid()
    stale_tmp = tmp_path / f".p.tmp-{dead}-0badc0de"
    stale_tmp.mkdir()
    (stale_tmp / "dose.npy").write_bytes(b"half")
    stale_old = tmp_path / f".p.old-{dead}"
    stale_old.mkdir()
    live = tmp_path / f".p.tmp-{os.getpid()}-12345678"  # a writer still running
    live.mkdir()
    other = tmp_path / f".q.tmp-{dead}-0badc0de"  # another output's: not ours to touch
    other.mkdir()
    cheap_plan.save(tmp_path / "p", report=False)
    assert not stale_tmp.exists() and not stale_old.exists()
    assert live.exists() and other.exists()
    # single files too
    stale_file = tmp_path / f".d.npz.tmp-{dead}-0badc0de"
    stale_file.write_bytes(b"half")
    cheap_plan.dij.save(tmp_path / "d.npz")
    assert not stale_file.exists()


def test_a_killed_save_leaves_litter_that_the_next_save_removes(tmp_path):
    code = (
        "import os, signal\n"
        "from atp.outputs import atomic_output_dir\n"
        f"with atomic_output_dir({str(tmp_path / 'p')!r}) as tmp:\n"
        "    (tmp / 'a.npy').write_bytes(b'x' * 1000)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n")
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True)
    assert r.returncode == -9
    assert len(_litter(tmp_path)) == 1 and not (tmp_path / "p").exists()
    with atomic_output_dir(tmp_path / "p") as tmp:
        (tmp / "a.npy").write_bytes(b"y")
    assert _litter(tmp_path) == []
    assert (tmp_path / "p" / "a.npy").read_bytes() == b"y"


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_concurrent_writers_last_one_wins_cleanly(tmp_path, monkeypatch, exchange):
    import atp.outputs

    if not exchange:  # file systems without RENAME_EXCHANGE: move aside, then rename
        monkeypatch.setattr(atp.outputs, "_renameat2", lambda: None)
    out = tmp_path / "p"
    errors = []

    def writer(i):
        try:
            for k in range(15):
                with atomic_output_dir(out) as tmp:
                    (tmp / "who.txt").write_text(f"{i}-{k}")
                    (tmp / "data.bin").write_bytes(bytes(2000) + bytes([i]))
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(repr(exc))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]
    who = (out / "who.txt").read_text()
    assert (out / "data.bin").read_bytes()[-1] == int(who.split("-")[0])  # one writer's set
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "who.txt", "data.bin"])


def test_sigterm_during_a_cli_save_leaves_nothing(tmp_path):
    code = (
        "import os, signal, sys, atp.commands.commission as c\n"
        "from atp.outputs import atomic_output_dir\n"
        "def save(args):\n"
        f"    with atomic_output_dir({str(tmp_path / 'p')!r}) as tmp:\n"
        "        (tmp / 'a.npy').write_bytes(b'x' * 1000)\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        signal.pause()\n"
        "c.run = save\n"
        "from atp.cli import main\n"
        "sys.exit(main(['commission']))\n")
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 143, r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_concurrent_processes_and_dij_saves(tmp_path, toy):
    code = (
        "import sys\n"
        "from atp.outputs import atomic_output_dir\n"
        "from atp.dose.influence import DoseInfluence\n"
        f"d = DoseInfluence.load({str(tmp_path / 'src.npz')!r})\n"
        "for k in range(6):\n"
        f"    with atomic_output_dir({str(tmp_path / 'p')!r}) as tmp:\n"
        "        (tmp / 'who.txt').write_text(sys.argv[1])\n"
        f"    d.save({str(tmp_path / 'dij.npz')!r})\n")
    toy.save(tmp_path / "src.npz")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dij.npz", "p", "src.npz"]
    assert (tmp_path / "p" / "who.txt").read_text() in {"0", "1"}
    from atp.dose.influence import DoseInfluence

    assert DoseInfluence.load(tmp_path / "dij.npz").matrix.nnz == toy.matrix.nnz


@pytest.mark.parametrize("umask", [0o022, 0o007])
def test_modes_follow_the_umask(cheap_plan, tmp_path, umask):
    old = os.umask(umask)
    try:
        out = cheap_plan.save(tmp_path / "p", report=False)
        cheap_plan.dij.save(tmp_path / "d.npz")
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask
    for f in [*out.iterdir(), tmp_path / "d.npz"]:
        assert (f.stat().st_mode & 0o777) == 0o666 & ~umask, f


# --- replan writes a new folder by default ---------------------------------------------------
def test_replan_default_keeps_the_source_plan(cheap_plan, tmp_path, monkeypatch, capsys):
    src = cheap_plan.save(tmp_path / "pt", report=False)
    before = _snapshot(src)
    args = ["replan", str(src), "--set", "Parotid_L.Dmean.tolerance=-20", "--warm",
            "--quiet", "--no-report"]
    assert main(args) in (0, 3)
    out = capsys.readouterr().out
    assert str(tmp_path / "pt-replan-1") in out
    assert _snapshot(src) == before
    assert json.loads((tmp_path / "pt-replan-1" / "plan.json").read_text())[
        "settings"]["replan_of"]["warm"] is True
    # a re-plan of a re-plan takes the next number
    assert main(["replan", str(tmp_path / "pt-replan-1"), "--warm", "--quiet",
                 "--no-report"]) in (0, 3)
    assert (tmp_path / "pt-replan-2" / "plan.json").is_file()
    assert _snapshot(src) == before
    # --in-place replaces the source (it is atp's) and says so
    assert main(args + ["--in-place"]) in (0, 3)
    assert str(src) in capsys.readouterr().out
    assert "replan_of" in json.loads((src / "plan.json").read_text())["settings"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pt", "pt-replan-1",
                                                          "pt-replan-2"]


def test_check_output_dir_returns_the_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_output_dir("new") == tmp_path / "new"
    assert clean_stale(tmp_path / "new") == []


def test_run_folders_are_written_into_only_when_atp_made_them(cheap_plan, tmp_path):
    from atp.outputs import mark_output_dir

    run = tmp_path / "run"
    run.mkdir()
    mark_output_dir(run, kind="train")
    (run / "last.pt").write_bytes(b"x")
    assert check_output_dir(run, replace=False) == run
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "train.log").write_text("{}")
    assert check_output_dir(legacy, replace=False) == legacy
    plan = cheap_plan.save(tmp_path / "plan", report=False)  # atp's, but not a run folder
    with pytest.raises(OutputError, match="not an atp train folder"):
        check_output_dir(plan, replace=False)
    with pytest.raises(OutputError, match="not written by atp"):  # nor the reverse
        check_output_dir(run)


# --- CLI: internal errors and closed pipes ------------------------------------------------------
def test_internal_error_is_one_line_and_a_traceback_file(tmp_path, monkeypatch, capsys):
    def broken(args):
        return 1 / 0

    monkeypatch.setattr("atp.commands.commission.run", broken)
    monkeypatch.setenv("ATP_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.delenv("ATP_DEBUG", raising=False)
    rc = main(["commission"])
    err = capsys.readouterr().err
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert "ZeroDivisionError" in lines[0]
    (log,) = (tmp_path / "logs").iterdir()
    assert str(log) in lines[0]
    text = log.read_text()
    assert "Traceback" in text and "1 / 0" in text


def test_closed_pipe_is_quiet():
    code = (
        "import sys, atp.commands.commission as c\n"
        "def spam(args):\n"
        "    for i in range(200000):\n"
        "        print('line', i)\n"
        "c.run = spam\n"
        "from atp.cli import main\n"
        "sys.exit(main(['commission']))\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, cwd=REPO)
    assert p.stdout.readline() == b"line 0\n"
    p.stdout.close()  # like `| head -1`
    err = p.stderr.read().decode()
    p.wait(timeout=60)
    assert err == ""
    assert p.returncode == 141
