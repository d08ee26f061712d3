"""The ``tinysaver`` command line: the parser, built from the commands that register themselves.

Every module of this package that defines ``register(subparsers)`` is a command; other packages add
theirs through the ``tinysaver.commands`` entry-point group (``esn`` does), so this package never
imports them. Handlers import the library on use, so ``tinysaver --help`` does not load torch.

Errors: a ``TinysaverError`` (bad input) prints one line and exits 2, an ``OSError`` (a file the
system refused) one line and exits 2, Ctrl-C one line and exits 130; anything else is a bug: its
traceback is printed with a line saying so, and the exit code is 3.
"""
from __future__ import annotations

import argparse
import os
import pkgutil
import sys
import traceback
import warnings
from importlib import import_module
from importlib.metadata import entry_points
from typing import Sequence

from .. import __version__
from ..errors import TinysaverError
from ._args import ROOT_HELP, HelpFormatter, fill_help

ENTRY_POINT_GROUP = "tinysaver.commands"
EXIT_USAGE, EXIT_BUG, EXIT_INTERRUPTED = 2, 3, 130
BUG_REPORT = "this is a bug in tinysaver, not in your input: please report it with the traceback above"


def builtin_commands() -> list[str]:
    """This package's command modules, in name order."""
    here = os.path.dirname(__file__)
    return sorted(m.name for m in pkgutil.iter_modules([here]) if not m.name.startswith("_") and m.name != "main")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tinysaver", formatter_class=HelpFormatter,
                                description="Pick small saver models that answer easy inputs first.")
    p.add_argument("--version", action="version", version=f"tinysaver {__version__}")
    p.add_argument("--root", default=None, help=ROOT_HELP)
    sub = p.add_subparsers(dest="command", required=True)
    for name in builtin_commands():
        import_module(f"{__package__}.{name}").register(sub)
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            register = ep.load()
        except ImportError as e:  # a plug-in installed without what it needs must not break the others
            print(f"tinysaver: warning: commands of {ep.value} not loaded: {e}", file=sys.stderr)
            continue
        register(sub)
    fill_help(p)
    return p


def _one_line(e: BaseException) -> str:
    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(msg.split())


def _os_error(e: OSError) -> str:
    what = e.strerror or str(e)
    return f"{e.filename}: {what.lower()}" if e.filename else what


def _warning_line(message, category, filename, lineno, line=None) -> str:
    # a user of the command line is told what happened, not which line of which library noticed
    return f"tinysaver: warning: {' '.join(str(message).split())}\n"


def plain_output() -> None:
    """Warnings as one plain line each, and file names that are not valid UTF-8 (kept by Python as
    surrogates) written with backslash escapes instead of stopping the command on a UnicodeEncodeError."""
    warnings.formatwarning = _warning_line
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def main(argv: Sequence[str] | None = None) -> int:
    plain_output()
    args = build_parser().parse_args(argv)
    try:
        rc = int(args.func(args) or 0)
        sys.stdout.flush()  # inside the try: a reader that left early is caught here, not at exit
        return rc
    except BrokenPipeError:  # `tinysaver ... | head`: the reader left; that is not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"\ntinysaver: {getattr(args, 'interrupted', 'interrupted')}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except TinysaverError as e:
        print(f"tinysaver: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # the system refused a file or a port: the environment, not tinysaver
        print(f"tinysaver: error: {_os_error(e)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception:
        traceback.print_exc()
        print(f"tinysaver: {BUG_REPORT}", file=sys.stderr)
        return EXIT_BUG


__all__ = ["ENTRY_POINT_GROUP", "EXIT_USAGE", "EXIT_BUG", "EXIT_INTERRUPTED", "BUG_REPORT",
           "builtin_commands", "build_parser", "plain_output", "main"]
