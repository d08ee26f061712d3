"""What the command modules share: argument types, the help formatter and the option groups that
several commands take. Defaults are read from the library, never written here twice."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from ..backends import BACKENDS
from ..policy import CRITERIA
from ..risk import METHODS as GUARANTEE_METHODS
from ..selector import SelectorConfig
from ..zoo import DEFAULT_ZOO


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (argparse's own formatter skips options without help)."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if "%(default)" not in text and action.option_strings and not (d is None or d is False or d == argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text.strip()

    def _expand_help(self, action):
        # a list default as the user would type it ("1,32" or "0 1 2"), not as Python prints it
        if isinstance(action.default, (list, tuple)):
            sep = " " if action.nargs in ("+", "*") else ","
            action = argparse.Action(action.option_strings, action.dest, nargs=action.nargs,
                                     default=sep.join(map(str, action.default)), type=action.type,
                                     choices=action.choices, required=action.required, help=action.help,
                                     metavar=action.metavar)
        return super()._expand_help(action)


def fill_help(parser: argparse.ArgumentParser) -> None:
    """argparse prints nothing for an option without help, default included: give each one a line."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                fill_help(sub)
        elif action.help is None and action.option_strings and action.default is not None \
                and action.default is not False and action.default != argparse.SUPPRESS:
            action.help = "(default: %(default)s)"


ROOT_HELP = ("a folder of zoos, looked in first and written to (then $TINYSAVER_ZOO_ROOT, the user data folder and "
             "the bundled zoos; 'tinysaver zoo list --paths' prints them)")
# --root is accepted before or after the subcommand: every command parser inherits this one
ROOT = argparse.ArgumentParser(add_help=False)
ROOT.add_argument("--root", default=argparse.SUPPRESS,
                  help=ROOT_HELP)


def command(parent, name: str, handler: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
    """One (sub)command: its parser, with ``handler`` as what runs it."""
    q = parent.add_parser(name, help=help_, description=help_, formatter_class=HelpFormatter, parents=[ROOT])
    q.set_defaults(func=handler)
    return q


def group(parent, name: str, help_: str, dest: str):
    """A command that only holds subcommands (``zoo``, ``esn``): returns its subparsers."""
    g = parent.add_parser(name, help=help_, description=help_, formatter_class=HelpFormatter)
    return g.add_subparsers(dest=dest, required=True)


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {v}")
    return v


def _number(text: str, ok, what: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not ok(v):  # NaN fails every comparison, so it is refused here too
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return v


def positive_float(text: str) -> float:
    return _number(text, lambda v: 0 < v < float("inf"), "a finite number > 0")


def non_negative_float(text: str) -> float:
    return _number(text, lambda v: 0 <= v < float("inf"), "a finite number ≥ 0")


def finite_float(text: str) -> float:
    """Any finite number: NaN and infinity are refused here, before they reach arithmetic."""
    return _number(text, lambda v: -float("inf") < v < float("inf"), "a finite number")


def int_list(text: str) -> list[int]:
    """'1,32,128' or '1' → [1, 32, 128] / [1]; each ≥ 1."""
    return [positive_int(t) for t in text.split(",") if t.strip()]


def backend_list(text: str) -> str | list[str]:
    """One backend name for every stage, or one per stage separated by commas."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown backend {(unknown or [text])[0]!r}; choose from {', '.join(BACKENDS)}")
    return names[0] if len(names) == 1 else names


def float_list(text: str) -> list[float]:
    """'0.9,0.8,inf' → [0.9, 0.8, inf]."""
    try:
        vals = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one number")
    return vals


def add_zoo(p: argparse.ArgumentParser, default: str | None = DEFAULT_ZOO, help_: str | None = None) -> None:
    p.add_argument("--zoo", default=default, help=help_ or "zoo name (in --root) or folder")


def add_pair(p: argparse.ArgumentParser, base_required: bool = True, saver: bool = True) -> None:
    """``--base`` (and ``--saver``): the pair an ESN or a plot is about."""
    p.add_argument("--base", required=base_required)
    if saver:
        p.add_argument("--saver", required=True)


def add_selector_args(p: argparse.ArgumentParser) -> None:
    """The selector's options, with ``SelectorConfig``'s defaults."""
    d = SelectorConfig()
    add_zoo(p)
    p.add_argument("--criterion", choices=CRITERIA, default=d.criterion)
    p.add_argument("--tolerance", type=finite_float, default=d.tolerance,
                   help="ε, allowed accuracy loss in points (1.0 = 1%%)")
    p.add_argument("--delta", type=finite_float, default=d.delta, help="δ of the guaranteed criterion")
    p.add_argument("--guarantee-method", choices=GUARANTEE_METHODS, default=d.guarantee_method,
                   help="the test behind the guaranteed criterion")
    p.add_argument("--cost", default=d.cost,
                   help="flops or latency:DEVICE:bsN[:BACKEND], e.g. latency:cpu:bs1 or latency:cpu:bs1:onnxruntime")
    p.add_argument("--label-free", action="store_true", help="use agreement with the base instead of labels")
    p.add_argument("--calibrate", choices=["temperature"], default=d.calibrate,
                   help="choose thresholds on temperature-scaled confidences (run 'tinysaver zoo calibrate' first)")
    p.add_argument("--max-stages", type=int, choices=[2, 3], default=d.max_stages,
                   help="3 also searches chains of two savers")
    p.add_argument("--calib-split", help="split to select on (default: calib, or half of the only split)")
    p.add_argument("--test-split", help="held-out split to report on (default: test, or the other half)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the half/half split when the zoo has one split")


def add_cascade_args(q: argparse.ArgumentParser, backend_default: str | None = BACKENDS[0],
                     backend_help: str = "") -> None:
    """What infer and serve share: the selection (made now, read from a file, or given by hand) and
    the backends its stages run on (``backend_default``: None leaves the choice to the library)."""
    add_selector_args(q)
    q.add_argument("--base", help="the base model (optional with --selection, which names it)")
    how = q.add_mutually_exclusive_group()
    how.add_argument("--from-selection", action="store_true",
                     help="run the selector now with the selector options (what happens without --selection/--threshold)")
    how.add_argument("--selection", help="a JSON file written by 'tinysaver query --save'")
    how.add_argument("--threshold", type=finite_float, help="the --saver's threshold, given by hand")
    q.add_argument("--saver", action="append",
                   help="with --threshold: that saver; alone: restrict the selector to these savers")
    q.add_argument("--accept-preprocess-change", action="store_true",
                   help="run a model whose current timm data config differs from the one the zoo recorded")
    q.add_argument("--backend", type=backend_list, default=backend_default,
                   help=f"{', '.join(BACKENDS)}: one for all stages, or one per stage, comma-separated{backend_help}")


def root_of(args: argparse.Namespace):
    """``--root`` as a Path, or None for the default root."""
    return Path(args.root) if getattr(args, "root", None) else None


__all__ = ["HelpFormatter", "fill_help", "ROOT_HELP", "ROOT", "command", "group", "positive_int",
           "positive_float", "non_negative_float", "finite_float", "int_list", "backend_list", "float_list",
           "add_zoo", "add_pair", "add_selector_args", "add_cascade_args", "root_of"]
