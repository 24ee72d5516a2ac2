"""The ``atp`` command line. Each subcommand lives in ``atp/commands/<name>.py`` with
``register(subparsers)``; this module only assembles them and maps errors to exit codes:

* 0 success; 2 bad input (:class:`~atp.errors.InputError`: one line naming file and
  field), unavailable backend/device, or an infeasible request; 3 (``plan`` / ``replan``
  / ``demo``) a plan was written but some priority-1 goals cannot be met; 1 anything
  unexpected: one line, and the full traceback written to a file whose path the line
  gives (``$ATP_LOG_DIR``, else ``$XDG_STATE_HOME/atp/errors``, else the temp folder;
  ``ATP_DEBUG=1`` raises instead); 141 the reader of the output went away
  (``atp ... | head``), silently.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from atp.errors import AtpError, InputError
from atp.version import __version__

COMMAND_MODULES = [
    "atp.commands.demo",
    "atp.commands.plan",
    "atp.commands.replan",
    "atp.commands.info",
    "atp.commands.goals",
    "atp.commands.evaluate",
    "atp.commands.train",
    "atp.commands.predict",
    "atp.commands.dij",
    "atp.commands.commission",
    "atp.commands.dose",
    "atp.commands.listing",
    "atp.commands.batch",
    "atp.commands.scorecard",
    "atp.commands.phantom",
]


class _OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2), like every other input error of atp."""

    def error(self, message: str):
        message = " ".join(str(message).split())
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="atp", description="Clinical-goal-guided automated radiotherapy planning.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND",
                                parser_class=_OneLineParser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2, one line)
        return exc.code if isinstance(exc.code, int) else 2
    if args.version:
        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    restore = _terminate_cleanly()
    try:
        rc = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return rc
    except BrokenPipeError:
        return _broken_pipe()
    except InputError as exc:
        print(f"atp {args.command}: error: {exc.one_line()}", file=sys.stderr)
        return 2
    except AtpError as exc:
        print(f"atp {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("atp: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the last line of defence: one line + a file
        if os.environ.get("ATP_DEBUG"):
            raise
        return _internal_error(args.command, exc, sys.argv[1:] if argv is None else argv)
    finally:
        restore()


EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for `yes | head`


def _terminate_cleanly():
    """SIGTERM (kill, a batch system's time limit) unwinds like Ctrl-C, so a save in
    progress removes its temporary folder; exit 143 = 128 + SIGTERM. Returns the function
    that puts the previous handler back (main() called from a host program)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL):
        return lambda: None

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _broken_pipe() -> int:
    """The reader of stdout/stderr closed it: stop quietly, with no second error when
    Python flushes the streams at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        try:
            os.dup2(devnull, stream.fileno())
        except (OSError, ValueError, AttributeError):
            continue
    os.close(devnull)
    return EXIT_BROKEN_PIPE


def error_log_dir() -> Path:
    """Where tracebacks of unexpected errors go (created on first use)."""
    if os.environ.get("ATP_LOG_DIR"):
        return Path(os.environ["ATP_LOG_DIR"])
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"),
                                                              ".local", "state")
    return Path(state) / "atp" / "errors"


def _internal_error(command: str, exc: BaseException, argv) -> int:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"atp-{command}-{stamp}-{os.getpid()}.txt"
    where = None
    for folder in (error_log_dir(), Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            path.write_text(f"atp {' '.join(map(str, argv))}\n{text}")
            where = path
            break
        except OSError:
            continue
    what = " ".join(f"{type(exc).__name__}: {exc}".split())
    what = what if len(what) <= 300 else what[:299] + "\u2026"
    tail = f"full traceback in {where}" if where else "the traceback could not be saved"
    try:
        print(f"atp {command}: internal error (a bug; please report it): {what}; {tail}",
              file=sys.stderr)
    except BrokenPipeError:
        return _broken_pipe()
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
