"""Plan a cohort: ``atp batch INPUT --out DIR [plan options]`` (issue 22).

INPUT is a folder of patients (OpenKBP ``.npz`` files, OpenKBP CSV folders, DICOM
folders; hidden entries and other files are ignored) or a CSV manifest (columns:
``patient`` (required; a path relative to the manifest's folder, or ``phantom``),
``name``, ``site``, ``institution``, ``prescription`` (``PTV_70=70; PTV_56=56``, DICOM
patients), ``fractions``). Every ``atp plan`` option applies to every patient; a manifest
column overrides the command-line value for its row.

Each patient is planned by ``atp plan``'s own code (:func:`atp.commands.plan.run`) in a
worker: a local process (``--workers N``, a fresh process per patient, so a worker holds
one patient at a time and its memory goes back after each) or a Ray task (``--ray
ADDRESS|auto|local``, ``max_calls=1``: the same). BLAS / OpenMP / torch threads per worker
are ``--threads`` (default ``cores // workers``), set in the worker's environment before
it imports anything. A worker killed mid-patient is re-run up to ``--max-retries`` times;
a patient's own error (a bad file) is recorded with its one-line message and exit code
and never stops the cohort.

Output folder ``DIR`` (an atp ``batch`` folder: new, empty or written by atp batch):

* ``DIR/<patient>/``: the plan folder, exactly as ``atp plan --out`` writes it;
* ``DIR/.atp-batch/<patient>.json``: the patient's record: input content hash (SHA-256
  of the file or of every file of the folder), options hash (every plan option, the
  contents of option files, the scorecard, atp's version), status, exit code, error,
  summary row, cumulative DVH per structure. A patient whose record has the same two
  hashes, a plan and a good status is skipped on the next run, so the same command
  after ``kill -9`` finishes only what is missing;
* ``DIR/summary.csv`` (and ``summary.parquet`` when pyarrow is installed): one row per
  patient (see :data:`FIRST_COLUMNS`, then the standard criteria ``crit:*``, every goal's
  achieved value ``goal:<id>`` and ``pass:<id>``, scorecard items ``score:<id>`` and
  timings per stage ``time:<stage>``), rewritten after every patient;
* ``DIR/cohort.html``: pass rate per goal with the worst patients, the standard criteria,
  scorecard, DVH bands (median, 10-90 %) per structure, time per stage, failures;
* ``DIR/batch.json``: the options, counts and wall time of the last run.

The parent process never loads a dose-influence matrix or a dose: it reads records.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import hashlib
import importlib.util
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from atp.cohort_report import dvh_curves, write_cohort_report
from atp.commands import common
from atp.commands import plan as plan_cmd
from atp.errors import AtpError, InputError, quote
from atp.goals.loader import list_sites
from atp.goals.metric import parse_metric
from atp.goals.resolve import measure
from atp.io.loader import PHANTOM_NAMES
from atp.outputs import (
    atomic_write_bytes,
    atomic_write_file,
    check_output_dir,
    mark_output_dir,
    write_json,
)
from atp.progress import is_terminal
from atp.refine_spec import parse_refine
from atp.scorecard import load_scorecard
from atp.version import __version__

BATCH_FORMAT = "atp-batch-1"
STATE_DIR = ".atp-batch"
MANIFEST_COLUMNS = ("patient", "name", "site", "institution", "prescription", "fractions")
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "BLIS_NUM_THREADS")
# argparse destinations of atp batch that are not plan options (not in the options hash)
BATCH_ONLY = frozenset({"input", "patient", "out", "workers", "threads", "ray", "max_retries",
                        "scorecard", "quiet", "json", "func", "command", "version"})
# plan options naming files whose contents shape the plan (hashed with the options)
FILE_OPTIONS = ("goal_list", "institution", "prescription_file", "predicted_dose", "dij",
                "machine")
GOOD = ("ok", "p1_unmet")  # statuses of a written plan
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
FIRST_COLUMNS = ("patient", "status", "exit_code", "error", "input", "site", "institution",
                 "attempts", "resumed", "seconds", "goals_passed", "goals_total", "p1_unmet",
                 "criteria_passed", "criteria_total", "score_total", "score_max",
                 "mu_per_fraction", "mu_per_cgy", "beam_on_s_per_fraction")
# the standard head-and-neck criteria (OpenKBP's; ../shared/eval/okbp_criteria.py):
# canonical structure, metric, operator, limit (Gy); targets: D99% >= 95 % of their Rx
OAR_CRITERIA = (("Brainstem", "D0.1cc", "<=", 50.0), ("SpinalCord", "D0.1cc", "<=", 45.0),
                ("Parotid_R", "Dmean", "<=", 26.0), ("Parotid_L", "Dmean", "<=", 26.0),
                ("Esophagus", "Dmean", "<=", 45.0), ("Larynx", "Dmean", "<=", 45.0),
                ("Bone_Mandible", "D0.1cc", "<=", 73.5))
TARGET_COVERAGE = ("D99%", 0.95)


@dataclass(frozen=True)
class Entry:
    """One patient of the cohort: its folder name in DIR, input path, and the manifest's
    per-patient overrides (None: the command line's)."""

    name: str
    path: str
    site: str | None = None
    institution: str | None = None
    rx: tuple = ()  # (("PTV_70", 70.0), ...)
    fractions: int | None = None


@dataclass(frozen=True)
class BatchOptions:
    out: Path
    workers: int = 1
    threads: int = 1
    ray: str | None = None
    max_retries: int = 2
    scorecard: str | None = None
    progress: bool = True
    plan_args: dict = field(default_factory=dict)


# --- the cohort --------------------------------------------------------------------------
def _safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", text).lstrip("._-") or "patient"
    return name[:100]


def discover(input_path) -> list[Entry]:
    """The patients of INPUT: a folder of patients or a CSV manifest."""
    p = Path(input_path).absolute()
    if p.is_file():
        if p.suffix.lower() == ".csv":
            return read_manifest(p)
        raise InputError("expected a folder of patients or a CSV manifest (.csv)", file=p,
                         field="INPUT")
    if not p.is_dir():
        raise InputError("no such file or folder", file=p, field="INPUT")
    entries = []
    for child in sorted(p.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_file() and child.suffix.lower() == ".npz":
            entries.append(Entry(_safe_name(child.stem), str(child)))
        elif child.is_dir():
            entries.append(Entry(_safe_name(child.name), str(child)))
    if not entries:
        raise InputError("no patients in the folder (expected OpenKBP .npz files, OpenKBP "
                         "CSV folders or DICOM folders)", file=p, field="INPUT")
    _check_unique(entries, p)
    return entries


def _check_unique(entries, file, lines=None) -> None:
    seen = {}
    for i, e in enumerate(entries):
        if e.name in seen:
            raise InputError(f"two patients would share the output folder {quote(e.name)} "
                             f"({seen[e.name]} and {e.path})", file=file,
                             line=lines[i] if lines else None, field="name")
        seen[e.name] = e.path


def _parse_rx(text: str, *, file, line) -> tuple:
    out = []
    for part in re.split(r"[;|]", text):
        if not part.strip():
            continue
        target, _, value = part.partition("=")
        try:
            gy = float(value)
        except ValueError:
            gy = float("nan")
        if not target.strip() or not 0 < gy < 1000:
            raise InputError(f"expected TARGET=GY[; TARGET=GY...] with doses in (0, 1000) "
                             f"Gy, got {quote(text, 60)}", file=file, line=line,
                             field="prescription")
        out.append((target.strip(), gy))
    return tuple(out)


def read_manifest(path) -> list[Entry]:
    """Read a CSV manifest (see the module docstring); every problem is one line naming
    the file, the line and the column."""
    path = Path(path).absolute()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError("cannot read manifest: not UTF-8 text", file=path) from None
    except OSError as exc:
        raise InputError(f"cannot read manifest: {exc.strerror or exc}", file=path) from None
    reader = csv.DictReader(io.StringIO(text))
    try:
        header = [h.strip() for h in (reader.fieldnames or [])]
    except csv.Error as exc:
        raise InputError(f"malformed CSV: {exc}", file=path, line=1) from None
    if not header:
        raise InputError("empty manifest: expected a header line with a 'patient' column",
                         file=path, line=1, field="patient")
    for h in header:
        if h not in MANIFEST_COLUMNS:
            raise InputError(f"unknown column (known: {', '.join(MANIFEST_COLUMNS)})",
                             file=path, line=1, field=h[:60])
    if "patient" not in header:
        raise InputError("missing column", file=path, line=1, field="patient")
    entries, lines = [], []
    sites = set(list_sites())
    try:
        for raw in reader:
            line = reader.line_num
            if None in raw:
                raise InputError("more fields than columns", file=path, line=line,
                                 field=header[-1])
            row = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
            if not any(row.values()):
                continue
            pat = row.get("patient", "")
            if not pat:
                raise InputError("empty", file=path, line=line, field="patient")
            full = pat if pat in PHANTOM_NAMES else str(path.parent / pat)
            if pat not in PHANTOM_NAMES and not Path(full).exists():
                raise InputError(f"no such file or folder {quote(full, 120)}", file=path,
                                 line=line, field="patient")
            name = row.get("name") or _safe_name(Path(pat).stem if pat.endswith(".npz")
                                                 else Path(pat).name)
            if not NAME_RE.match(name):
                raise InputError(f"{quote(name, 60)} is not a folder name (letters, digits, "
                                 "'.', '_', '-')", file=path, line=line, field="name")
            site = row.get("site") or None
            if site is not None and site not in sites:
                raise InputError(f"unknown site {quote(site, 40)}; shipped: "
                                 f"{', '.join(sorted(sites))}", file=path, line=line,
                                 field="site")
            inst = row.get("institution") or None
            rx = _parse_rx(row.get("prescription", ""), file=path, line=line)
            fx = None
            if row.get("fractions"):
                try:
                    fx = int(row["fractions"])
                except ValueError:
                    fx = 0
                if not 1 <= fx <= 100:
                    raise InputError(f"must be an integer 1..100, got "
                                     f"{quote(row['fractions'], 20)}", file=path, line=line,
                                     field="fractions")
            entries.append(Entry(name, full, site, inst, rx, fx))
            lines.append(line)
    except csv.Error as exc:
        raise InputError(f"malformed CSV: {exc}", file=path, line=reader.line_num) from None
    if not entries:
        raise InputError("no patients (no rows after the header)", file=path,
                         field="patient")
    _check_unique(entries, path, lines)
    return entries


# --- hashes ------------------------------------------------------------------------------
def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def input_hash(path: str) -> str:
    """SHA-256 of the patient's content: the file, or every file of the folder (relative
    path and content); the embedded phantom: its name (its code is atp's version)."""
    if path in PHANTOM_NAMES:
        return hashlib.sha256(f"embedded:{path}".encode()).hexdigest()
    p = Path(path)
    if p.is_file():
        return _file_sha(p)
    h = hashlib.sha256()
    if p.is_dir():
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            h.update(f.relative_to(p).as_posix().encode() + b"\0")
            h.update(_file_sha(f).encode() + b"\n")
    return h.hexdigest()


def patient_args(entry: Entry, plan_args: dict) -> dict:
    """The plan options of one patient: the command line's with its manifest overrides."""
    a = dict(plan_args)
    if entry.site is not None:
        a["site"], a["goal_list"] = entry.site, None
    if entry.institution is not None:
        a["institution"] = entry.institution
    if entry.rx:
        a["rx"] = [f"{t}={gy:g}" for t, gy in entry.rx]
    if entry.fractions is not None:
        a["fractions"] = entry.fractions
    return a


def options_hash(args: dict, scorecard_file: str | None) -> str:
    """SHA-256 of every plan option (files by content), the scorecard (give it only when
    it shapes the plan: ``--refine scorecard``, :func:`plan_scorecard`) and atp's
    version."""
    d = {k: v for k, v in sorted(args.items()) if k not in BATCH_ONLY}
    for k in FILE_OPTIONS:
        v = d.get(k)
        if isinstance(v, str) and Path(v).is_file():
            d[k] = {"file": v, "sha256": _file_sha(Path(v))}
    d["_scorecard"] = _file_sha(Path(scorecard_file)) if scorecard_file else None
    d["_atp"] = __version__
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def plan_scorecard(args: dict, scorecard_file: str | None) -> str | None:
    """The scorecard that shapes the plans (``--refine scorecard``: it is in the options
    hash), else None: a scorecard that only scores plans is not, so changing it re-scores
    the finished plans instead of planning them again."""
    spec = args.get("refine")
    try:
        mode = parse_refine(spec).mode
    except InputError:
        return None
    return scorecard_file if mode == "scorecard" else None


def scorecard_hash(scorecard_file: str | None) -> str | None:
    return _file_sha(Path(scorecard_file)) if scorecard_file else None


# --- one patient (runs in a worker) --------------------------------------------------------
def thread_env(threads: int) -> dict:
    return {v: str(int(threads)) for v in THREAD_VARS}


def _one_line(exc: BaseException) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= 300 else text[:299] + "\u2026"


def standard_criteria(patient, dose_gy) -> list[dict]:
    """OpenKBP's standard H&N criteria on ``dose_gy`` for the structures the patient has:
    each target's D99% >= 95 % of its prescription, cord / brainstem / mandible D0.1cc and
    parotid / larynx / oesophagus means (limits in :data:`OAR_CRITERIA`)."""
    todo = [(p.target, TARGET_COVERAGE[0], ">=", TARGET_COVERAGE[1] * p.dose_gy)
            for p in patient.prescriptions]
    todo += list(OAR_CRITERIA)
    out = []
    for structure, metric, op, limit in todo:
        s = patient.structures.get(structure)
        if s is None or s.n_voxels == 0:
            continue
        v = float(measure(parse_metric(metric), patient, structure, dose_gy))
        out.append({"id": f"{structure}.{metric}", "value": v, "limit": limit, "op": op,
                    "passed": v <= limit if op == "<=" else v >= limit})
    return out


def _namespace(job: dict):
    a = dict(job["args"])
    a.update(patient=job["path"], out=str(Path(job["out"]) / job["name"]), quiet=True,
             json=False)
    return argparse.Namespace(**a)


def _measure(job: dict, args, rec: dict) -> None:
    """The summary of a written plan: plan.json's goals, MU and timings; criteria, DVH
    curves and scorecard from the plan's dose on the patient (loaded again)."""
    plan_dir = Path(args.out)
    data = json.loads((plan_dir / "plan.json").read_text(encoding="utf-8"))
    row = rec["row"]
    goals = []
    for g in data.get("goals", []):
        goals.append({k: g.get(k) for k in ("id", "structure", "metric", "operator", "value",
                                             "unit", "priority", "achieved", "passed",
                                             "margin")})
        row[f"goal:{g['id']}"] = g.get("achieved")
        row[f"pass:{g['id']}"] = g.get("passed")
    rec["goals"] = goals
    summ = data.get("summary") or {}
    row["goals_passed"] = summ.get("goals_passed")
    row["goals_total"] = summ.get("goals_total")
    row["p1_unmet"] = sum(1 for g in goals if g["priority"] == 1 and g["passed"] is False)
    deliv = data.get("delivery") or {}
    row["mu_per_fraction"] = deliv.get("mu_per_fraction")
    row["mu_per_cgy"] = deliv.get("mu_per_cgy")
    row["beam_on_s_per_fraction"] = deliv.get("delivery_time_s_per_fraction")
    rec["timings_s"] = {k: float(v) for k, v in (data.get("timings_s") or {}).items()}
    refined = (data.get("optimizer") or {}).get("refine") or {}
    if refined.get("mode") == "scorecard":  # the goal-list plan's total, rounds kept
        row["refine:score_start"] = refined["scores"][0]
        row["refine:rounds_kept"] = sum(bool(k) for k in refined["accepted"])
    for k, v in rec["timings_s"].items():
        row[f"time:{k}"] = round(v, 3)
    patient = common.load_patient_from_args(args)
    dose = np.load(plan_dir / "dose.npy", allow_pickle=False)
    crit = standard_criteria(patient, dose)
    rec["criteria"] = crit
    for c in crit:
        row[f"crit:{c['id']}"] = c["value"]
        row[f"crit_pass:{c['id']}"] = c["passed"]
    row["criteria_passed"] = sum(c["passed"] for c in crit)
    row["criteria_total"] = len(crit)
    rec["dvh"] = dvh_curves(patient, dose)
    score_into(rec, job.get("scorecard"), patient, dose)


def score_into(rec: dict, scorecard_file: str | None, patient, dose) -> None:
    """The scorecard's scores of ``dose`` into a patient's record (replacing any earlier
    scorecard's)."""
    row = rec["row"]
    for k in [k for k in row if k.startswith("score:") or k in ("score_total",
                                                                  "score_max")]:
        del row[k]
    rec.pop("scorecard", None)
    if scorecard_file:
        sc = load_scorecard(scorecard_file).evaluate(patient, dose)
        rec["scorecard"] = sc
        row["score_total"] = round(sc["total"], 4)
        row["score_max"] = sc["max_total"]
        for it in sc["items"]:
            row[f"score:{it['id']}"] = it["score"]


def rescore(job: dict, rec: dict) -> dict:
    """A finished patient's record scored again with the job's scorecard (its plan is
    kept: the scorecard did not shape it); written back into DIR/.atp-batch."""
    args = _namespace(job)
    patient = common.load_patient_from_args(args)
    dose = np.load(Path(args.out) / "dose.npy", allow_pickle=False)
    score_into(rec, job.get("scorecard"), patient, dose)
    rec["scorecard_hash"] = job["scorecard_hash"]
    write_json(record_path(job["out"], job["name"]), rec)
    return rec


def plan_one(job: dict) -> dict:
    """Plan one patient (``job``: name, path, out, args, hashes, scorecard) with atp
    plan's code, write its record into DIR/.atp-batch and return it. A problem of the
    patient (bad input, an internal error) is recorded, not raised."""
    t0 = time.perf_counter()
    rec = {"format": BATCH_FORMAT, "name": job["name"], "input": job["path"],
           "input_hash": job["input_hash"], "options_hash": job["options_hash"],
           "scorecard_hash": job.get("scorecard_hash"),
           "status": "failed", "exit_code": 1, "error": "", "attempt": job.get("attempt", 1),
           "row": {}}
    try:
        args = _namespace(job)
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            rc = int(plan_cmd.run(args) or 0)
        rec["exit_code"] = rc
        rec["status"] = "ok" if rc == 0 else "p1_unmet" if rc == plan_cmd.EXIT_HARD_UNMET \
            else "failed"
        if rec["status"] in GOOD:
            _measure(job, args, rec)
    except InputError as exc:
        rec.update(exit_code=2, status="failed", error=exc.one_line())
    except AtpError as exc:
        rec.update(exit_code=2, status="failed", error=" ".join(str(exc).split()))
    except Exception as exc:  # noqa: BLE001 - one patient's bug never stops the cohort
        rec.update(exit_code=1, status="failed", error=_one_line(exc),
                   traceback=traceback.format_exc())
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    rec["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json(record_path(job["out"], job["name"]), rec)
    return rec


def record_path(out, name: str) -> Path:
    return Path(out) / STATE_DIR / f"{name}.json"


def _die_with_parent() -> None:
    """Linux: this worker gets SIGKILL when the batch process dies (kill -9 of the batch
    leaves no orphan writing into DIR)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker_main(job: dict, parent_pid: int) -> None:
    """Plan ``job`` in this worker process; it dies with the batch process."""
    _die_with_parent()
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
    plan_one(job)


# --- executors -----------------------------------------------------------------------------
def _failure(job: dict, error: str, attempts: int) -> dict:
    rec = {"format": BATCH_FORMAT, "name": job["name"], "input": job["path"],
           "input_hash": job["input_hash"], "options_hash": job["options_hash"],
           "status": "failed", "exit_code": 1, "error": error, "attempt": attempts,
           "row": {}, "seconds": None}
    write_json(record_path(job["out"], job["name"]), rec)
    return rec


def _describe_exit(code) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


WORKER_CODE = "import sys; from atp.batch import worker_cli; sys.exit(worker_cli(sys.argv[1:]))"


def worker_cli(argv) -> int:
    """``python -c WORKER_CODE JOB.json PARENT_PID``: a local worker process. A fresh
    interpreter (not multiprocessing): the caller's main module is never imported again,
    and the thread variables are in its environment before numpy / torch load."""
    job_file, parent = argv
    job = json.loads(Path(job_file).read_text(encoding="utf-8"))
    _worker_main(job, int(parent))
    return 0


def run_local(jobs: list, workers: int, threads: int, max_retries: int, on_done) -> None:
    """Run ``jobs`` in at most ``workers`` local processes at a time, one fresh process
    per patient (its stderr in DIR/.atp-batch/<name>.log); a worker that dies is re-run
    up to ``max_retries`` times."""
    pending = deque(jobs)
    running: list = []
    attempts: dict = {}
    env = dict(os.environ, **thread_env(threads))
    try:
        while pending or running:
            while pending and len(running) < workers:
                job = pending.popleft()
                attempts[job["name"]] = attempts.get(job["name"], 0) + 1
                job = dict(job, attempt=attempts[job["name"]])
                rp = record_path(job["out"], job["name"])
                if rp.exists():
                    rp.unlink()
                job_file = rp.with_name(f"{job['name']}.job.json")
                write_json(job_file, job)
                with open(rp.with_name(f"{job['name']}.log"), "wb") as log:
                    proc = subprocess.Popen(
                        [sys.executable, "-c", WORKER_CODE, str(job_file), str(os.getpid())],
                        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                        stderr=log)
                running.append((proc, job, job_file))
            time.sleep(0.2)
            for item in [r for r in running if r[0].poll() is not None]:
                running.remove(item)
                proc, job, job_file = item
                job_file.unlink(missing_ok=True)
                rec = _read_record(job) if proc.returncode == 0 else None
                if rec is None:
                    why = _describe_exit(proc.returncode)
                    if attempts[job["name"]] <= max_retries:
                        on_done(None, note=f"{job['name']}: worker {why}; re-running "
                                           f"(attempt {attempts[job['name']] + 1})")
                        pending.append(job)
                        continue
                    rec = _failure(job, f"worker {why} on each of {attempts[job['name']]} "
                                        "attempts", attempts[job["name"]])
                on_done(rec)
    finally:
        for proc, _, _ in running:
            proc.kill()
            proc.wait()


def _read_record(job: dict) -> dict | None:
    try:
        rec = json.loads(record_path(job["out"], job["name"]).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("format") == BATCH_FORMAT else None


def _ray_plan_one(job: dict) -> dict:
    return plan_one(job)


def run_ray(jobs: list, address: str, threads: int, max_retries: int, on_done) -> None:
    """Run ``jobs`` as Ray tasks (``address``: a cluster address, ``auto`` for the
    running cluster, ``local`` for a new single-machine instance). Every node must see
    INPUT and DIR at the same paths (a shared file system) and have atp installed. A
    task whose worker or node dies is re-run by Ray up to ``max_retries`` times."""
    try:
        import ray  # lazy: optional dependency (atp[cluster]), only for --ray
    except ImportError:
        raise AtpError("--ray needs Ray: pip install 'atp[cluster]'") from None
    started = not ray.is_initialized()  # a host program may have called ray.init itself
    if started:
        try:
            if address == "local":
                ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False,
                         log_to_driver=False)
            else:
                ray.init(address=address, log_to_driver=False)
        except Exception as exc:  # noqa: BLE001 - Ray raises plain Exception / ConnectionError
            ray.shutdown()
            raise AtpError(f"cannot {'start' if address == 'local' else 'connect to'} Ray "
                           f"({address}): {_one_line(exc)[:300]}") from None
    try:
        task = ray.remote(num_cpus=threads, max_calls=1, max_retries=max_retries,
                          retry_exceptions=False,
                          runtime_env={"env_vars": thread_env(threads)})(_ray_plan_one)
        refs = {task.remote(job): job for job in jobs}
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1, timeout=5.0)
            for r in done:
                job = refs.pop(r)
                try:
                    rec = ray.get(r)
                except ray.exceptions.RayError as exc:
                    rec = _failure(job, f"ray: {_one_line(exc)[:200]} (after "
                                        f"{max_retries} retries)", max_retries + 1)
                on_done(rec)
    finally:
        if started:
            ray.shutdown()


# --- progress ------------------------------------------------------------------------------
class Progress:
    """One bar over patients with ETA (a terminal) or one line per patient (a log), on
    stderr; silent when disabled."""

    def __init__(self, enabled: bool, total: int, todo: int, skipped: int, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled, self.total, self.todo = enabled, total, todo
        self.done = skipped
        self.finished_now = 0
        self.t0 = time.monotonic()
        self.bar = None
        if enabled and is_terminal(self.stream):
            self.bar = tqdm(total=total, initial=skipped, file=self.stream, unit="patient",
                            desc="atp batch", leave=True)

    def _line(self, text: str) -> None:
        if not self.enabled:
            return
        try:
            if self.bar is not None:
                self.bar.write(f"atp batch: {text}", file=self.stream)
            else:
                print(f"atp batch: {text}", file=self.stream, flush=True)
        except (BrokenPipeError, ValueError):
            self.enabled = False

    def note(self, text: str) -> None:
        self._line(text)

    def patient(self, rec: dict) -> None:
        self.done += 1
        self.finished_now += 1
        left = self.todo - self.finished_now
        el = time.monotonic() - self.t0
        eta = el / self.finished_now * left
        row = rec.get("row", {})
        if rec["status"] in GOOD:
            what = (f"{rec['status']}, goals {row.get('goals_passed')}/"
                    f"{row.get('goals_total')}, criteria {row.get('criteria_passed')}/"
                    f"{row.get('criteria_total')}")
            if row.get("score_total") is not None:
                what += f", score {row['score_total']:.1f}/{row['score_max']:.0f}"
        else:
            what = f"failed (exit {rec['exit_code']}): {rec.get('error', '')}"
        secs = rec.get("seconds")
        took = f", {secs:.1f} s" if isinstance(secs, (int, float)) else ""
        tail = f"; ETA {_hms(eta)}" if left > 0 and self.bar is None else ""
        self._line(f"[{self.done}/{self.total}] {rec['name']}: {what}{took}{tail}")
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _hms(s: float) -> str:
    s = round(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else \
        f"{s // 60}:{s % 60:02d}"


# --- the batch -----------------------------------------------------------------------------
@dataclass
class BatchResult:
    out: Path
    records: dict  # name -> record (None: not finished)
    resumed: list
    wall_s: float
    files: dict

    @property
    def counts(self) -> dict:
        c = {"ok": 0, "p1_unmet": 0, "failed": 0, "missing": 0}
        for r in self.records.values():
            c[r["status"] if r else "missing"] += 1
        return c

    @property
    def exit_code(self) -> int:
        """0 every plan written with its priority-1 goals met; 3 every plan written, some
        priority-1 goals unmet; 4 some patients failed (see summary.csv)."""
        c = self.counts
        if c["failed"] or c["missing"]:
            return EXIT_SOME_FAILED
        return 3 if c["p1_unmet"] else 0


EXIT_SOME_FAILED = 4


def run_batch(entries: list, opts: BatchOptions) -> BatchResult:
    """Plan every patient of ``entries`` into ``opts.out`` (see the module docstring)."""
    t0 = time.perf_counter()
    out = check_output_dir(opts.out, replace=False, kind="batch")
    scorecard_file = None
    if opts.scorecard:
        scorecard_file = load_scorecard(opts.scorecard).file  # a bad scorecard: exit 2 now
    out.mkdir(parents=True, exist_ok=True)
    mark_output_dir(out, kind="batch")
    (out / STATE_DIR).mkdir(exist_ok=True)
    records, jobs, resumed = {}, [], []
    for e in entries:
        job, old = _job(e, opts, out, scorecard_file)
        records[e.name] = old
        if old is None:
            jobs.append(job)
        else:
            resumed.append(e.name)
    order = [e.name for e in entries]
    meta = {e.name: e for e in entries}
    prog = Progress(opts.progress, len(entries), len(jobs), len(resumed))
    if resumed:
        prog.note(f"{len(resumed)} of {len(entries)} patients already planned with the same "
                  "input and options: kept")

    def summarise(final: bool = False) -> dict:
        return write_summary(out, order, records, meta, resumed, final=final)

    def on_done(rec, note=None):
        if rec is None:
            prog.note(note)
            return
        records[rec["name"]] = rec
        prog.patient(rec)
        summarise()

    try:
        if jobs:
            if opts.ray:
                run_ray(jobs, opts.ray, opts.threads, opts.max_retries, on_done)
            else:
                run_local(jobs, max(1, opts.workers), opts.threads, opts.max_retries, on_done)
    finally:
        prog.close()
    files = summarise(final=True)
    wall = time.perf_counter() - t0
    result = BatchResult(out, records, resumed, wall, files)
    write_json(out / "batch.json", {
        "format": BATCH_FORMAT, "patients": len(entries), "counts": result.counts,
        "resumed": resumed, "planned_now": len(jobs), "wall_s": round(wall, 3),
        "workers": None if opts.ray else opts.workers, "ray": opts.ray,
        "threads_per_worker": opts.threads, "max_retries": opts.max_retries,
        "scorecard": scorecard_file, "plan_options": {k: v for k, v in opts.plan_args.items()
                                                     if k not in BATCH_ONLY},
        "files": files})
    return result


def _job(e: Entry, opts: BatchOptions, out: Path, scorecard_file):
    """(job, the finished record to keep or None). A patient is kept when its plan exists
    with the same input and options hashes (a record of a batch written before the
    scorecard left the options hash carries the scorecard in its options hash: that
    matches too); when only the scorecard differs, its plan is re-scored, not re-planned."""
    args = patient_args(e, opts.plan_args)
    job = {"name": e.name, "path": e.path, "out": str(out), "args": args,
           "input_hash": input_hash(e.path),
           "options_hash": options_hash(args, plan_scorecard(args, scorecard_file)),
           "scorecard": scorecard_file, "scorecard_hash": scorecard_hash(scorecard_file),
           "site": args.get("site"), "institution": args.get("institution")}
    old = _read_record(job)
    if not (old is not None and old.get("status") in GOOD
            and old.get("input_hash") == job["input_hash"]
            and old.get("options_hash") in (job["options_hash"],
                                            options_hash(args, scorecard_file))
            and (out / e.name / "plan.json").is_file()):
        return job, None
    if old.get("scorecard_hash", "legacy") != job["scorecard_hash"]:
        try:
            old = rescore(job, old)
        except Exception:  # noqa: BLE001 - the plan cannot be re-scored: plan it again
            return job, None
    return job, old


def summary_rows(order, records, meta, resumed) -> list[dict]:
    rows = []
    for name in order:
        rec = records.get(name)
        e = meta[name]
        row = {"patient": name, "input": e.path}
        if rec is None:
            row.update(status="missing", exit_code=None, error="not finished")
        else:
            row.update(status=rec["status"], exit_code=rec["exit_code"],
                       error=rec.get("error", ""), attempts=rec.get("attempt"),
                       seconds=rec.get("seconds"), resumed=name in resumed)
            row.update(rec.get("row", {}))
        row.setdefault("site", e.site)
        row.setdefault("institution", e.institution)
        rows.append(row)
    return rows


def _columns(rows) -> list[str]:
    """FIRST_COLUMNS, then the criteria, goals (value, pass), scores, scorecard
    refinement and timings in the order the patients' rows first name them."""
    cols = list(FIRST_COLUMNS)
    extra: dict = {}
    for prefix in ("crit", "goal:", "pass:", "score:", "refine:", "time:"):
        for r in rows:
            for k in r:
                if k.startswith(prefix) and k not in extra:
                    extra[k] = None
    goal_ids = [k[5:] for k in extra if k.startswith("goal:")]
    crit = [k for k in extra if k.startswith("crit:")]
    ordered = [c for k in crit for c in (k, "crit_pass:" + k[5:])]
    ordered += [c for g in goal_ids for c in (f"goal:{g}", f"pass:{g}")]
    ordered += [k for k in extra if k.startswith(("score:", "refine:", "time:"))]
    return cols + [k for k in ordered if k in extra]


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "pass" if v else "fail"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def write_summary(out: Path, order, records, meta, resumed, *, final: bool) -> dict:
    """summary.csv (always), summary.parquet (pyarrow installed) and, when ``final``,
    cohort.html. Returns {kind: file name or the reason it was not written}."""
    rows = summary_rows(order, records, meta, resumed)
    cols = _columns(rows)
    # pass columns keep the goal's name: crit_pass:<id> / pass:<id>
    for r in rows:
        for k in ("resumed",):
            if k in r:
                r[k] = "yes" if r[k] else "no"
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow([_cell(r.get(c)) for c in cols])
    atomic_write_bytes(out / "summary.csv", buf.getvalue().encode())
    files = {"summary_csv": "summary.csv"}
    if not final:
        return files
    if importlib.util.find_spec("pyarrow") is not None:
        # lazy: optional dependency (pyarrow), only for summary.parquet
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({c: [_cell(r.get(c)) if c in ("error",) or isinstance(
            r.get(c), (bool, str)) else r.get(c) for r in rows] for c in cols})
        atomic_write_file(out / "summary.parquet", lambda fh: pq.write_table(table, fh))
        files["summary_parquet"] = "summary.parquet"
    else:
        files["summary_parquet"] = "not written: pyarrow is not installed"
    files["cohort_html"] = write_cohort_report(out, order, records, rows)
    return files
