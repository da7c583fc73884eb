"""The ``tlcm`` command line: a thin dispatcher over :mod:`tlcm.commands`, and the one place where failures become
messages.

A :class:`~tlcm.errors.TLCMError`, and the failures a user can act on (disk full, no permission, a path that is a
file, out of memory), print one line with the path and a fix and exit with status 2; Ctrl-C exits with 130. Anything
else is a bug and keeps its traceback. ``--debug`` (before or after the command) shows the traceback in every case.
Building the parser imports no heavy library, so ``tlcm --help`` is fast (``tests/reliability/test_cli.py``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import traceback

from tlcm import commands
from tlcm.errors import TLCMError, describe_failure


def _command_modules():
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        yield importlib.import_module(f"{commands.__name__}.{info.name}")


def build_parser() -> argparse.ArgumentParser:
    from tlcm import __version__

    parser = argparse.ArgumentParser(
        prog="tlcm",
        description="Data-free few-step distillation of latent diffusion models: synthesize, distill, sample, "
        "evaluate, export.",
    )
    parser.add_argument("--version", action="version", version=f"tlcm {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of any error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _command_modules():
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of any error")
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 1
    debug = bool(getattr(args, "debug", False) or os.environ.get("TLCM_DEBUG"))
    name = f"tlcm {args.command}"
    try:
        return int(args._run(args) or 0)
    except TLCMError as err:
        if debug:
            traceback.print_exc()
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        again = "the same command with --resume latest" if args.command == "distill" else "the same command"
        print(f"{name}: interrupted; the files written so far are complete, and {again} continues", file=sys.stderr)
        return 130
    except Exception as err:  # libraries wrap OSError in their own types; describe_failure looks inside
        message = describe_failure(err)
        if message is None or debug:
            raise
        print(f"{name}: error: {message}\n  (run with --debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
