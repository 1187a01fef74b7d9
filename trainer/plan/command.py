"""`python -m trainer.plan` (the `sdtrainer plan` subcommand): print a recipe's memory plan.

    python -m trainer.plan --config examples/train/lowvram_sd15.json --vram 8
    python -m trainer.plan --config train.json --optimizer_config optimizer.json --batch_size 4 --json

Every train.json key can be overridden as in train.py (`--KEY VALUE`). `--vram GIB` is the
budget; without it, the free memory of the visible GPU, else no budget (the table only).
`--device cuda|cpu` is the device planned for (default: cuda, the device runs are sized for;
cpu plans a CPU run). Exit code 0: fits or no budget; 1: does not fit; 2: bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from trainer.config import load_config
from trainer.optim import load_optimizer_file
from trainer.plan.check import resolve_budget
from trainer.plan.memory import plan_memory
from trainer.plan.report import plan_json, plan_table
from trainer.runtime.errors import TrainerError

log = logging.getLogger("trainer.plan")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.plan",
        description="Plan a recipe's peak GPU memory by category, against a budget, before anything loads.",
        epilog="Any other --KEY VALUE is a train.json override, as for train.py.",
    )
    parser.add_argument("--config", help="train.json (its keys, with the overrides, are the recipe)")
    parser.add_argument(
        "--vram", type=float, help="the budget in GiB (default: the visible GPU's free memory)"
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="the device to plan for")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--no_advice", action="store_true", help="do not search for changes that make it fit")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, overrides = build_parser().parse_known_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        cfg = load_config(args.config, overrides)
        opt_file = load_optimizer_file(cfg.optimizer_config)
        budget, source = resolve_budget(args.vram, args.device)
        plan = plan_memory(
            cfg,
            opt_file,
            device=args.device,
            budget_bytes=budget,
            budget_source=source,
            with_advice=not args.no_advice,
        )
    except TrainerError as exc:
        log.error("%s", exc)
        return exc.exit_code
    print(json.dumps(plan_json(plan), indent=2) if args.json else plan_table(plan))
    return 1 if plan.fits is False else 0


if __name__ == "__main__":
    sys.exit(main())
