"""``atp batch`` on a small phantom cohort: two workers with one bad file, kill -9 and
resume, Ray tasks giving the same doses as local workers, bad manifests (exit 2), and
``atp scorecard`` on a batch's plan.

The cohort is a CSV manifest of the embedded phantom (twice) and a corrupt .npz, planned
with a toy dose-influence matrix, the baseline predictor, 150 iterations and no
sequencing, so a patient takes seconds.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from atp.cli import main

FAST = ["--predictor", "baseline", "--backend", "cpu", "--max-iter", "150", "--no-sequence",
        "--no-report", "--quiet"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, phantom):
    from atp.optimizer.testing import toy_dij

    d = tmp_path_factory.mktemp("cohort")
    toy_dij(phantom, n_beams=5, factor=2).save(d / "toy.npz")
    (d / "bad.npz").write_bytes(b"not an npz archive")
    (d / "cohort.csv").write_text("patient,name\nphantom,a\nphantom,b\nbad.npz,c\n")
    return d


def _args(cohort, out, *extra):
    return ["batch", str(cohort / "cohort.csv"), "--out", str(out), "--dij",
            str(cohort / "toy.npz"), *FAST, *extra]


def _summary(out):
    with open(out / "summary.csv", newline="") as fh:
        return {r["patient"]: r for r in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def two_workers(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("b2") / "out"
    rc = main(_args(cohort, out, "--workers", "2"))
    return out, rc


@pytest.mark.slow
def test_two_workers_plan_the_cohort_and_record_the_bad_file(two_workers):
    out, rc = two_workers
    assert rc == 4  # some patients failed; the others are planned
    rows = _summary(out)
    assert list(rows) == ["a", "b", "c"]
    for name in ("a", "b"):
        r = rows[name]
        assert r["status"] in ("ok", "p1_unmet") and r["error"] == ""
        assert (out / name / "plan.json").is_file() and (out / name / "dose.npy").is_file()
        assert int(r["goals_total"]) > 10 and r["score_total"] != ""
        assert float(r["crit:SpinalCord.D0.1cc"]) > 0
        assert r["crit_pass:SpinalCord.D0.1cc"] in ("pass", "fail")
        assert r["pass:PTV_70.D95%"] in ("pass", "fail") and r["time:optimise (cpu)"] != ""
    bad = rows["c"]
    assert bad["status"] == "failed" and bad["exit_code"] == "2"
    assert "bad.npz" in bad["error"] and "\n" not in bad["error"]
    assert not (out / "c").exists()
    # the same patient and options in two workers: the same dose, bit for bit
    assert np.array_equal(np.load(out / "a" / "dose.npy"), np.load(out / "b" / "dose.npy"))
    html = (out / "cohort.html").read_text()
    for section in ("pass rate", "DVH bands", "Time per stage", "bad.npz"):
        assert section in html
    assert json.loads((out / "batch.json").read_text())["counts"] == {
        "ok": sum(rows[n]["status"] == "ok" for n in "ab"),
        "p1_unmet": sum(rows[n]["status"] == "p1_unmet" for n in "ab"),
        "failed": 1, "missing": 0}


@pytest.mark.slow
def test_parquet_summary_when_pyarrow_is_installed(two_workers):
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is not installed")
    out, _ = two_workers
    t = pq.read_table(out / "summary.parquet")
    assert t.column("patient").to_pylist() == ["a", "b", "c"]
    assert t.column("status").to_pylist()[2] == "failed"
    assert t.schema.field("goal:PTV_70.D95%").type == "double"


@pytest.mark.slow
def test_scorecard_command_scores_a_batch_plan(two_workers, capsys):
    out, _ = two_workers
    assert main(["scorecard", str(out / "a"), "--scorecard", "hn", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["total"] == pytest.approx(float(_summary(out)["a"]["score_total"]), abs=1e-3)
    assert (out / "a" / "scorecard-hn.json").is_file()
    from atp.outputs import check_output_dir

    check_output_dir(out / "a")  # still atp's folder: a later plan may replace it


@pytest.mark.slow
def test_kill_9_then_rerun_finishes_only_what_is_missing(cohort, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "atp.cli", *_args(cohort, out, "--workers", "1")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / ".atp-batch" / "a.json"

    def a_finished():  # the batch has taken a's result into its summary
        try:
            return _summary(out)["a"]["status"] != "missing"
        except (OSError, KeyError):
            return False

    try:
        deadline = time.monotonic() + 300
        while not a_finished() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert a_finished(), "the first patient did not finish"
        os.killpg(proc.pid, signal.SIGKILL)  # the whole batch: parent and worker
    finally:
        proc.wait(timeout=60)
    rows = _summary(out)
    assert rows["a"]["status"] in ("ok", "p1_unmet")
    assert rows["b"]["status"] == "missing"  # b was in flight when the batch died
    kept = {f: (out / "a" / f).stat().st_mtime_ns for f in ("plan.json", "dose.npy")}
    kept_rec = first.read_text()
    rc = main(_args(cohort, out, "--workers", "1"))
    assert rc == 4  # c is still a bad file
    rows = _summary(out)
    assert [rows[n]["status"] != "missing" for n in "abc"] == [True, True, True]
    assert rows["a"]["resumed"] == "yes" and rows["b"]["resumed"] == "no"
    assert {f: (out / "a" / f).stat().st_mtime_ns for f in kept} == kept  # not recomputed
    assert first.read_text() == kept_rec
    assert (out / "b" / "plan.json").is_file()
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".") and "tmp" in p.name]
    assert leftovers == []


@pytest.mark.slow
def test_a_killed_worker_is_retried(cohort, tmp_path):
    out = tmp_path / "out"
    manifest = tmp_path / "one.csv"
    manifest.write_text(f"patient,name\nphantom,a\n{cohort / 'bad.npz'},c\n")
    cmd = [sys.executable, "-m", "atp.cli", "batch", str(manifest), "--out", str(out),
           "--dij", str(cohort / "toy.npz"), *FAST[:-1], "--workers", "1"]
    proc = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job = out / ".atp-batch" / "a.job.json"
    deadline = time.monotonic() + 120
    while not job.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # the worker is importing or planning
    children = f"/proc/{proc.pid}/task/{proc.pid}/children"
    with open(children) as fh:
        pids = [int(p) for p in fh.read().split()]
    assert len(pids) == 1
    os.kill(pids[0], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 4, stderr  # c is a bad file; a is planned on its second try
    assert "a: worker killed by SIGKILL; re-running (attempt 2)" in stderr
    rows = _summary(out)
    assert rows["a"]["status"] in ("ok", "p1_unmet") and rows["a"]["attempts"] == "2"
    assert rows["c"]["attempts"] == "1"


def test_changed_options_replan_a_finished_patient(cohort, tmp_path):
    """The options hash covers every plan option: another --max-iter is a new plan."""
    from atp.batch import Entry, input_hash, options_hash, patient_args

    a = patient_args(Entry("a", "phantom"), {"max_iter": 150, "quiet": True, "workers": 1})
    b = dict(a, max_iter=151)
    c = dict(a, quiet=False, workers=2)  # display and parallelism do not count
    assert options_hash(a, None) != options_hash(b, None)
    assert options_hash(a, None) == options_hash(c, None)
    assert input_hash(str(cohort / "bad.npz")) != input_hash(str(cohort / "toy.npz"))


@pytest.mark.slow
def test_ray_tasks_give_the_same_doses_as_local_workers(cohort, two_workers, tmp_path):
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'atp[cluster]')")
    err = None
    for _ in range(3):  # a local head in this process, as a user's script would start it
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            break
        except Exception as exc:  # noqa: BLE001 - Ray gives its raylet 30 s to start
            err = exc
            ray.shutdown()
    else:
        pytest.skip(f"a local Ray head did not start on this (loaded) machine: {err}")
    out = tmp_path / "ray"
    try:
        rc = main(_args(cohort, out, "--ray", "auto", "--threads", "1"))
    finally:
        ray.shutdown()
    assert rc == 4
    rows = _summary(out)
    assert rows["c"]["status"] == "failed" and rows["c"]["exit_code"] == "2"
    local, _ = two_workers
    for name in ("a", "b"):
        assert np.array_equal(np.load(out / name / "dose.npy"),
                              np.load(local / name / "dose.npy"))


@pytest.mark.parametrize("text, line, field", [
    ("patient,colour\nphantom,red\n", ":1", "colour"),
    ("name\na\n", ":1", "patient"),
    ("patient,name\nphantom,a\nnothere.npz,b\n", ":3", "patient"),
    ("patient,name\nphantom,a\nphantom,a\n", ":3", "name"),
    ("patient,site\nphantom,mars\n", ":2", "site"),
    ("patient,prescription\nphantom,PTV_70=abc\n", ":2", "prescription"),
    ("patient,fractions\nphantom,0\n", ":2", "fractions"),
])
def test_bad_manifest_is_exit_2_naming_file_and_field(tmp_path, capsys, text, line, field):
    m = tmp_path / "m.csv"
    m.write_text(text)
    rc = main(["batch", str(m), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert f"{m}{line}" in err and f"field '{field}'" in err
    assert not (tmp_path / "out").exists()


def test_bad_scorecard_or_empty_folder_is_exit_2_before_any_plan(tmp_path, capsys):
    m = tmp_path / "m.csv"
    m.write_text("patient\nphantom\n")
    card = tmp_path / "card.yaml"
    card.write_text("items: []\n")
    rc = main(["batch", str(m), "--out", str(tmp_path / "out"), "--scorecard", str(card),
               "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and str(card) in err and "field 'items'" in err
    assert not (tmp_path / "out" / "phantom").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["batch", str(empty), "--out", str(tmp_path / "o2")]) == 2
    assert "no patients in the folder" in capsys.readouterr().err
