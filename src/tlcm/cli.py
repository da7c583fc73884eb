"""The ``tlcm`` command line: a thin dispatcher over :mod:`tlcm.commands`."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from tlcm import commands
from tlcm.errors import TLCMError


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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _command_modules():
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 1
    try:
        return int(args._run(args) or 0)
    except TLCMError as err:
        print(f"tlcm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tlcm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
