"""The ``atp`` command line. Each subcommand lives in ``atp/commands/<name>.py`` with
``register(subparsers)``; this module only assembles them and maps errors to exit codes:

* 0 success; 2 bad input (:class:`~atp.errors.InputError`: one line naming file and
  field), unavailable backend/device, or an infeasible request; 3 (``plan`` / ``replan``
  / ``demo``) a plan was written but some priority-1 goals cannot be met; 1 anything
  unexpected.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from atp.errors import AtpError, InputError

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
    "atp.commands.listing",
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
    args = parser.parse_args(argv)
    if args.version:
        from atp import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except InputError as exc:
        print(f"atp {args.command}: error: {exc.one_line()}", file=sys.stderr)
        return 2
    except AtpError as exc:
        print(f"atp {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("atp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
