"""``tinysaver query``: the best saver(s) and threshold(s) for one base, and the command that runs them."""
from __future__ import annotations

import argparse
import shlex

from ..errors import UsageError
from ..gears import GearPlan, plan_gears
from ..report import render
from ..selector import SelectorConfig, select
from ..sources import SOURCES
from ..zoo import load_zoo
from ._args import add_selector_args, command, finite_float, positive_int


def register(sub) -> None:
    q = command(sub, "query", cmd_query, "best saver and threshold for one base model")
    add_selector_args(q)
    q.add_argument("--base", required=True)
    q.add_argument("--saver", action="append", help="restrict candidates to these savers (repeat for several)")
    q.add_argument("--top", type=positive_int, default=5, help="how many candidates to list")
    q.add_argument("--save", help="write the selection as JSON, for 'tinysaver infer --selection FILE'")
    q.add_argument("--quiet", action="store_true", help="print the answer's one sentence only")
    q.add_argument("--gears", action="store_true",
                   help="also plan gears: the selected saver's certified operating points, from the zero-loss "
                        "policy down to the cheapest within --max-loss at --delta (saved with --save)")
    q.add_argument("--max-loss", type=finite_float, help="the gears' loss budget ε, in accuracy points")


def cmd_query(args: argparse.Namespace) -> int:
    if args.gears != (args.max_loss is not None):
        raise UsageError("--gears plans within a loss budget: give both --gears and --max-loss POINTS")
    zoo = load_zoo(args.zoo, args.root)
    result = select(zoo, args.base, SelectorConfig.from_options(args), savers=args.saver, top=args.top)
    print(render(result, quiet=args.quiet))
    sel = result.best
    if args.gears:
        sel = plan_gears(sel, zoo, args.max_loss, SelectorConfig.from_options(args))
        print("\n" + GearPlan.from_dict(sel.gears).table())
    if args.quiet:
        if args.save:
            sel.save(args.save)
        return 0
    zoo_arg = f"--zoo {shlex.quote(args.zoo)}"
    unbuildable = [m for m in sel.models if not zoo.entry(m).source.get("name")]
    if unbuildable:  # imported as predictions only: there is nothing to run
        if args.save:
            sel.save(args.save)
            print(f"\nselection saved to {args.save}")
        print(f"\n{', '.join(unbuildable)} {'was' if len(unbuildable) == 1 else 'were'} imported as predictions only, "
              "so infer and serve cannot run this selection; re-import with --weights MODEL=TIMM_NAME to run it")
        return 0
    if args.save:
        sel.save(args.save)  # a folder or an unwritable place is refused before anything is written
        print(f"\nselection saved to {args.save}; run it with:\n"
              f"  tinysaver infer {zoo_arg} --selection {shlex.quote(args.save)} IMAGES...")
    else:
        print(f"\nnext: save it with --save sel.json, then run it with:\n"
              f"  tinysaver infer {zoo_arg} --selection sel.json IMAGES...\n"
              f"(no images at hand? tinysaver data sample {sample_source(zoo)} --out imgs -n 20)")
    return 0


def sample_source(zoo) -> str:
    """A dataset ``tinysaver data sample`` can draw from whose classes the zoo's models know: the one
    its dataset kind names for this zoo (`tinysaver.sources`), the 20 ImageNet images foolbox ships
    for another ImageNet zoo, else the zoo's test (or first) split."""
    for kind in map(SOURCES.get, SOURCES):
        if kind.sample and kind.zoo and kind.zoo[0] == zoo.name:
            return kind.sample
    if zoo.manifest.get("splits") and any(v.get("class_names") == "imagenet" for v in zoo.splits.values()):
        return "foolbox"
    if not zoo.splits:
        return "fashion-mnist"
    return shlex.quote(zoo.splits.get("test", next(iter(zoo.splits.values())))["source"])


__all__ = ["register", "cmd_query", "sample_source"]
