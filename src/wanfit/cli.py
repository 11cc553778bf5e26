"""The `wanfit` command line: generate | plan | doctor | bench | calibrate-cache | demo.

Each subcommand lives in wanfit.commands.<name>; this module only builds the parser and turns
user errors into one clear sentence and a non-zero exit.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from wanfit import __version__
from wanfit.errors import WanfitError, WanfitWarning

# Subcommand modules, in the order `wanfit --help` lists them.
COMMANDS: list[str] = ["generate", "plan", "doctor", "bench", "calibrate_cache", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wanfit",
        description="Run Wan2.1 text-to-video on whatever machine you have.",
    )
    parser.add_argument("--version", action="version", version=f"wanfit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"wanfit.commands.{name}").add_parser(sub)
    return parser


def _format_warning(message, category, filename, lineno, line=None, _default=warnings.formatwarning):
    """wanfit's own warnings as one line, `wanfit: warning: ...`; others as Python formats them.

    (formatwarning, not showwarning: a caller that records warnings, like pytest, still gets them.)"""
    from wanfit.attention.dispatch import AttentionFallbackWarning

    if issubclass(category, (WanfitWarning, AttentionFallbackWarning)):
        return f"wanfit: warning: {str(message).removeprefix('wanfit: ')}\n"
    return _default(message, category, filename, lineno, line)


def required_package(err: ModuleNotFoundError) -> str | None:
    """The distribution wanfit declares as required whose import failed with `err` (None: another's)."""
    from importlib.metadata import PackageNotFoundError, requires

    top = (err.name or "").split(".")[0]
    if not top:
        return None
    try:
        declared = requires("wanfit") or []
    except PackageNotFoundError:  # run from a checkout without installing
        return None
    for line in declared:
        if "extra ==" in line:
            continue
        name = line.split(";")[0].strip()
        for stop in "<>=!~[ ":
            name = name.split(stop)[0]
        if name.lower().replace("-", "_") == top.lower():
            return name
    return None


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _format_warning
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for a command that restarts itself
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except WanfitError as err:
        print(f"wanfit: error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        missing = required_package(err)
        if missing is None:
            raise
        print(
            f"wanfit: error: wanfit needs the {missing} package, which is not installed in this Python "
            f"({sys.executable}); install it with: pip install {missing}",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt as err:
        # A command may say what was kept: KeyboardInterrupt("interrupted after step 3 of 10; ...").
        print(f"wanfit: {err if str(err) else 'interrupted.'}", file=sys.stderr)
        return 130
