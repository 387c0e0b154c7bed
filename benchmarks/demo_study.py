"""Screen iLR-DPO recipes for the demo over seeds (issue 12; results in docs/demo/study.md).

Every variant is an arm: a list of section.key=value overrides on top of the demo's settings.
Per seed, vanilla iterative DPO runs first and every variant reuses its iteration-0 evaluation
and iteration-1 pairs (the same base model, prompts and seed), then all arms answer the second
held-out set (unless --no-heldout). Settings are chosen on the bundled eval prompts only.

    python benchmarks/demo_study.py --out /tmp/study/screen --seeds 0,1 --iterations 2 --n-eval 30 \\
        --variant neutral="experimental.alpha_neutral=true loss.alpha=1.5" \\
        --variant tgt="loss.alpha=0.0125 loss.target_length=base"
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ilrdpo.demo import VANILLA, _subset, bundled_prompts, run_study
from ilrdpo.demo.heldout import evaluate_heldout
from ilrdpo.demo.study import write_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=OVERRIDES",
                        help="an arm: name=space-separated overrides (repeatable)")
    parser.add_argument("--n-train", type=int)
    parser.add_argument("--n-eval", type=int)
    parser.add_argument("--iterations", type=int)
    parser.add_argument("--n-heldout", type=int, default=105)
    parser.add_argument("--no-heldout", action="store_true")
    parser.add_argument("--heldout-only", action="store_true",
                        help="no training: answer the second held-out set with the finished runs, rewrite study.md")
    parser.add_argument("--arms", help="with --heldout-only: comma-separated arms (default: idpo and the variants)")
    parser.add_argument("overrides", nargs="*", help="overrides for every arm")
    args = parser.parse_args()
    arms = {"idpo": VANILLA}
    for spec in args.variant:
        name, _, overrides = spec.partition("=")
        arms[name] = overrides.split()
    sizes = {key: value for key, value in (("n_train", args.n_train), ("n_eval", args.n_eval),
                                          ("iterations", args.iterations)) if value is not None}
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.heldout_only:
        heldout_after(Path(args.out), seeds, args.arms.split(",") if args.arms else list(arms), args.n_heldout)
        return
    run_study(args.out, seeds, arms=arms, sizes=sizes, overrides=args.overrides, heldout=not args.no_heldout)


def heldout_after(out: Path, seeds: list[int], arms: list[str], n_heldout: int) -> None:
    """The second held-out set for runs that were trained with --no-heldout."""
    base = None
    for seed in seeds:
        runs = [out / f"seed_{seed}" / arm for arm in arms if (out / f"seed_{seed}" / arm / "state.json").exists()]
        prompts = _subset(bundled_prompts("heldout"), n_heldout, out / f"seed_{seed}" / "data")
        evaluate_heldout(runs, prompts, base=base)
        base = runs[0]
    write_study(out, seeds, arms)


if __name__ == "__main__":
    main()
