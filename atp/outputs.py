"""Writing results without losing anyone's files and without leaving anything half-written.

Rules (every command that writes goes through this module):

* atp only replaces a folder it wrote itself: one holding the marker ``.atp-output.json``
  (written last into every output folder, listing what atp put there) and nothing else,
  or a plan folder of an older atp (``plan.json`` of format ``atp-plan-1`` and only the
  files a plan holds). An empty folder may be used too. Anything else -- a folder with a
  user's file, the working folder, a file where a folder is wanted, a symbolic link -- is
  refused with :class:`~atp.errors.OutputError` (CLI exit 2, one line naming the path).
  A single output file (``.npz`` / ``.npy``) is replaced only when it is of the format
  atp writes there (see :func:`check_output_file`).
* Commands call :func:`check_output_dir` / :func:`check_output_file` before any work:
  the path rules above, a writable existing ancestor (missing parents are created when the
  results are written), free space and the file-size limit (``ulimit -f``).
* ``atomic_output_dir(out)`` yields a temporary folder ``.NAME.tmp-PID-TOKEN`` beside
  ``out``; when the block finishes it is renamed onto ``out`` (an existing atp folder is
  swapped out by renames and removed), when it raises the temporary folder is removed and
  ``out`` is untouched. Concurrent writers each use their own temporary name; the last to
  rename wins and nothing is left behind. Temporary and swapped-out names of processes
  that died (killed, power cut) are removed on the next write to the same name.
* Folders and files are created with the modes the user's umask gives (no 0700/0600).
* A write that fails for lack of space, the file-size limit or a read-only file system
  raises :class:`~atp.errors.OutputError` (exit 2) after removing its temporary files.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np

from atp.errors import OutputError
from atp.version import __version__

MARKER = ".atp-output.json"
# what an atp-plan-1 folder written before the marker existed may hold
LEGACY_PLAN_FILES = {"plan.json", "dose.npy", "predicted_dose.npy", "ideal_dose.npy",
                     "fluence.npz", "dij.npz", "report.html", "patient.json", "dicom"}
# a plan folder: dij.npz dominates (35 MB for the phantom demo, more on OpenKBP
# patients); the check before the work can only ask for a floor, a save that still runs
# out of space fails with one line and removes what it wrote
PLAN_MIN_BYTES = 64 * 2**20
FILE_MIN_BYTES = 2**20
WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EROFS,
                getattr(errno, "EDQUOT", errno.ENOSPC)}
_STALE = r"\.(?:tmp|old)-(\d+)(?:-[0-9a-f]+)?$"


# --- checks before the work ---------------------------------------------------------------
def _abs(path) -> Path:
    """Absolute path without resolving the last component (a link stays a link)."""
    return Path(os.path.abspath(os.fspath(path)))


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB"


def _existing_ancestor(path: Path, field: str | None) -> Path:
    parent = path.parent
    while not parent.exists():
        if parent.is_symlink():  # a dangling link
            raise OutputError("a parent is a broken symbolic link", file=parent, field=field)
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError("a parent is not a folder", file=parent, field=field)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError("folder is not writable", file=parent, field=field)
    return parent


def _check_space(path: Path, ancestor: Path, min_bytes: int, field: str | None) -> None:
    try:
        st = os.statvfs(ancestor)
    except (OSError, AttributeError):
        st = None
    if st is not None:
        if st.f_flag & getattr(os, "ST_RDONLY", 1):
            raise OutputError("read-only file system", file=ancestor, field=field)
        free = st.f_bavail * st.f_frsize
        if free < min_bytes:
            raise OutputError(f"only {_mb(free)} free on this file system; writing here "
                              f"needs at least {_mb(min_bytes)}", file=path, field=field)
    try:
        import resource  # lazy: Unix-only; without it the ulimit check is skipped

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (ImportError, OSError, ValueError):
        return
    if soft != resource.RLIM_INFINITY and soft < min_bytes:
        raise OutputError(f"the file-size limit (ulimit -f) is {_mb(soft)}; writing here "
                          f"needs files of at least {_mb(min_bytes)}", file=path, field=field)


def _foreign_entries(folder: Path) -> list[str] | None:
    """Entries of ``folder`` atp did not write, or None when it is not atp's folder."""
    marker = folder / MARKER
    allowed = None
    if marker.is_file() and not marker.is_symlink():
        try:
            data = json.loads(marker.read_text())
            if data.get("writer") == "atp" and isinstance(data.get("entries"), list):
                allowed = {str(e) for e in data["entries"]} | {MARKER}
        except (OSError, ValueError, AttributeError):
            allowed = None
    legacy = False
    if allowed is None:
        pj = folder / "plan.json"
        try:
            legacy = pj.is_file() and json.loads(pj.read_text()).get("format") == "atp-plan-1"
        except (OSError, ValueError, AttributeError):
            legacy = False
        if not legacy:
            return None
    foreign = []
    for root, dirs, files in os.walk(folder):
        for name in sorted(dirs) + sorted(files):
            rel = (Path(root) / name).relative_to(folder).as_posix()
            if legacy:
                top = rel.split("/", 1)[0]
                ok = top in LEGACY_PLAN_FILES and (
                    top == rel or (top == "dicom" and rel.endswith(".dcm")))
            else:
                ok = rel in allowed
            if not ok:
                foreign.append(rel)
    return foreign


def _replace_problem(out: Path) -> str | None:
    """Why the existing ``out`` may not be replaced by an atp folder (None: it may)."""
    if out.is_symlink():
        return "is a symbolic link; give the folder itself"
    if not out.exists():
        return None
    if not out.is_dir():
        return "is a file, not a folder; atp does not replace it"
    cwd = _abs(os.getcwd())
    if cwd == out or out in cwd.parents:
        return "is the working folder (or holds it); give a new folder"
    try:
        empty = not any(os.scandir(out))
    except OSError as exc:
        return f"cannot read: {exc.strerror}"
    if empty:
        return None
    if not os.access(out, os.W_OK | os.X_OK):
        return "folder is not writable, so atp could not remove it after replacing it"
    foreign = _foreign_entries(out)
    if foreign is None:
        return ("folder exists and was not written by atp; atp only replaces its own plan "
                "folders -- give a new folder")
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        return (f"atp folder holds files atp did not write ({foreign[0]}{more}); move them "
                "or give a new folder")
    return None


def _identity(path: Path):
    try:
        st = os.lstat(path)
    except OSError:  # gone, or a parent is not a folder
        return None
    return _stat_identity(st)


def _stat_identity(st):
    # the change time too: a rename changes it, so a folder moved away and back differs
    return st.st_dev, st.st_ino, st.st_ctime_ns


def _pin(path: Path):
    """An open descriptor of the folder at ``path`` (None if there is none): while it is
    open the folder's inode cannot be freed and reused by another writer's new folder."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        return os.open(path, flags)
    except OSError:
        return None


def _check_replaceable(out: Path, field: str | None) -> None:
    """Raise :class:`OutputError` unless the existing ``out`` may be replaced. Looks
    again when another atp writer swapped ``out`` while it was being read (a read during a
    swap can find the folder gone or half-moved, which says nothing about its owner): the
    folder is pinned by a descriptor, and the look counts only when that folder is still
    the one at ``out`` afterwards. Backs off a little each time; a folder that never holds
    still is reported as such."""
    for k in range(200):
        fd = _pin(out)
        try:
            before = _identity(out) if fd is None else _stat_identity(os.fstat(fd))
            problem = _replace_problem(out)
            # absent before and after but a problem seen: a folder came and went
            stable = _identity(out) == before and (before is not None or not problem)
        finally:
            if fd is not None:
                os.close(fd)
        if stable:
            if problem:
                raise OutputError(problem, file=out, field=field)
            return
        if k >= 10:
            time.sleep(min(0.0005 * (k - 9), 0.02))
    raise OutputError("could not read the folder: other processes keep replacing it",
                      file=out, field=field)


def _marker_kind(folder: Path) -> str | None:
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data.get("kind") if isinstance(data, dict) and data.get("writer") == "atp" else None


def check_output_dir(out, *, min_bytes: int = PLAN_MIN_BYTES, replace: bool = True,
                     kind: str = "train", field: str | None = "--out") -> Path:
    """Before the work: the absolute ``out`` if atp may write the folder there, else
    :class:`OutputError`. replace=False: the folder is written into, not replaced (a
    training run folder): it must be new, empty or atp's own folder of that ``kind``
    (its marker says so, or, written before the marker, it holds ``train.log``)."""
    out = _abs(out)
    if replace:
        _check_replaceable(out, field)
    else:
        if out.is_symlink() and not out.is_dir():
            raise OutputError("is a broken symbolic link", file=out, field=field)
        if out.exists():
            if not out.is_dir():
                raise OutputError("is a file, not a folder", file=out, field=field)
            if any(os.scandir(out)) and not (_marker_kind(out) == kind or (
                    _marker_kind(out) is None and (out / "train.log").is_file())):
                raise OutputError(f"folder exists and is not an atp {kind} folder; give a "
                                  "new folder", file=out, field=field)
            if not os.access(out, os.W_OK | os.X_OK):
                raise OutputError("folder is not writable", file=out, field=field)
    anc = _existing_ancestor(out, field)
    _check_space(out, anc, min_bytes, field)
    return out


def check_output_file(path, *, recognise=None, what: str = "file",
                      min_bytes: int = FILE_MIN_BYTES, field: str | None = "--out") -> Path:
    """Before the work: the absolute ``path`` if atp may write that file, else
    :class:`OutputError`. An existing file is replaced only when ``recognise(path)`` says
    it is of the kind atp writes there (``what`` names that kind in the message)."""
    path = _abs(path)
    if path.is_symlink():
        raise OutputError("is a symbolic link; give the file itself", file=path, field=field)
    if path.exists():
        if path.is_dir():
            raise OutputError("is a folder; give a file name", file=path, field=field)
        if recognise is None or not _safe(recognise, path):
            raise OutputError(f"file exists and is not {what}; atp does not overwrite it",
                              file=path, field=field)
    anc = _existing_ancestor(path, field)
    _check_space(path, anc, min_bytes, field)
    return path


def _safe(fn, path) -> bool:
    try:
        return bool(fn(path))
    except Exception:  # noqa: BLE001 - any failure to read means "not recognised"
        return False


def is_npy_dose(path) -> bool:
    """A float32 3-D ``.npy`` (what ``atp predict`` writes)."""
    a = np.load(path, mmap_mode="r", allow_pickle=False)
    return isinstance(a, np.ndarray) and a.ndim == 3 and a.dtype == np.float32


# --- temporary names and stale ones ---------------------------------------------------------
def _temp_name(name: str, kind: str) -> str:
    return f".{name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def clean_stale(path) -> list[Path]:
    """Remove ``.NAME.tmp-PID-*`` / ``.NAME.old-PID*`` beside ``path`` left by processes
    that no longer run (only entries of the current user). Returns what was removed."""
    path = _abs(path)
    pat = re.compile(r"^\." + re.escape(path.name) + _STALE)
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    uid = os.getuid() if hasattr(os, "getuid") else None
    for e in entries:
        m = pat.match(e.name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        try:
            if uid is not None and e.stat(follow_symlinks=False).st_uid != uid:
                continue
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path)
            else:
                os.unlink(e.path)
            removed.append(Path(e.path))
        except OSError:
            continue
    return removed


def _as_output_error(exc: BaseException, out: Path):
    if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
        return OutputError(f"cannot write: {os.strerror(exc.errno)}", file=out)
    return None


# --- folders ------------------------------------------------------------------------------
def _entries(folder: Path) -> list[str]:
    out = []
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            out.append((Path(root) / name).relative_to(folder).as_posix())
    return sorted(out)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported
    or either is gone."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.ENOTSUP):
        _RENAMEAT2[0] = None  # not on this file system / kernel: two renames from now on
    return False


_RENAMEAT2: list = []


def _renameat2():
    if not _RENAMEAT2:
        fn = None
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                           ctypes.c_uint]
            fn.restype = ctypes.c_int
        except (OSError, AttributeError, TypeError):
            fn = None
        _RENAMEAT2.append(fn)
    return _RENAMEAT2[0]


def _install_dir(tmp: Path, out: Path, field: str | None) -> None:
    """Rename the finished ``tmp`` onto ``out``; an existing atp folder at ``out`` is
    swapped out and removed. Safe against other writers doing the same."""
    for _ in range(100):
        try:
            os.rename(tmp, out)  # out absent (or an empty folder)
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
                raise
        _check_replaceable(out, field)
        if _exchange(tmp, out):  # tmp now holds the previous folder
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = out.with_name(_temp_name(out.name, "old"))
        try:
            os.rename(out, old)
        except FileNotFoundError:  # another writer moved it first
            continue
        try:
            os.rename(tmp, out)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                with contextlib.suppress(OSError):  # put the previous folder back
                    os.rename(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)  # another writer got in between
            continue
        shutil.rmtree(old, ignore_errors=True)
        return
    raise OutputError("could not replace the folder: other processes keep writing it",
                      file=out, field=field)


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, *, kind: str = "plan",
                      field: str | None = None):
    """Yield a temporary folder; on success it becomes ``out`` (see the module rules).

    Raises :class:`OutputError` before yielding when ``out`` may not be replaced.
    Missing parents are created.
    """
    out = _abs(out)
    _check_replaceable(out, field)
    clean_stale(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(_temp_name(out.name, "tmp"))
        os.mkdir(tmp, 0o777)  # the umask applies
    except OSError as exc:
        err = _as_output_error(exc, out)
        if err is None:
            err = OutputError(f"cannot create the folder: {exc.strerror}", file=out,
                              field=field)
        raise err from None
    try:
        yield tmp
        write_json(tmp / MARKER, {"writer": "atp", "version": __version__, "kind": kind,
                                  "entries": _entries(tmp)})
        _install_dir(tmp, out, field)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        err = _as_output_error(exc, out)
        if err is not None:
            raise err from None
        raise


def mark_output_dir(folder, *, kind: str) -> None:
    """Write the marker into a folder atp writes into over time (a training run), so a
    later check recognises it as atp's."""
    folder = Path(folder)
    if not (folder / MARKER).exists():
        write_json(folder / MARKER, {"writer": "atp", "version": __version__, "kind": kind,
                                     "entries": None})


# --- files --------------------------------------------------------------------------------
def atomic_write_file(path: str | os.PathLike, write) -> None:
    """Call ``write(binary file object)`` on a temporary file beside ``path``, then rename
    it onto ``path`` (umask modes, unique temporary name, removed on failure)."""
    path = _abs(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    tmp = path.with_name(_temp_name(path.name, "tmp"))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                     0o666)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        err = _as_output_error(exc, path)
        if err is not None:
            raise err from None
        raise


def write_npz(fh, arrays: dict, *, stored=(), level: int = 1) -> None:
    """An ``.npz`` (what :func:`numpy.load` reads) of ``arrays`` into the binary file object
    ``fh``: the members named in ``stored`` uncompressed, the others deflated at ``level``.
    A dose matrix's float32 values barely compress (the mantissa bytes are noise: 8 % at
    zlib's default level, at ~20 MB/s), its indices and the small arrays do; so storing
    those values plain writes a dij several times faster for a file ~15 % larger."""
    with zipfile.ZipFile(fh, mode="w", compression=zipfile.ZIP_DEFLATED,
                         compresslevel=level, allowZip64=True) as zf:
        for name, value in arrays.items():
            member = f"{name}.npy"
            if name in stored:  # a ZipInfo of its own carries the member's method
                member = zipfile.ZipInfo(member, date_time=time.localtime()[:6])
                member.compress_type = zipfile.ZIP_STORED
                member.external_attr = 0o600 << 16
            with zf.open(member, "w", force_zip64=True) as out:
                np.lib.format.write_array(out, np.asanyarray(value), allow_pickle=False)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write_file(path, lambda fh: fh.write(data))


def to_jsonable(obj):
    """Convert numpy scalars/arrays and paths inside nested containers for json.dumps."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(to_jsonable(obj), indent=2) + "\n").encode())
