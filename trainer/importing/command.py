"""`python -m trainer.importing.command SOURCE [--dataset_config TOML] --out DIR`

Translates a kohya_ss GUI JSON or an sd-scripts `--config_file` TOML (plus its
`--dataset_config` TOML) into train.json + optimizer.json, and prints what every source key
became (docs/MIGRATING.md). Exit codes: 0 written, 2 bad input (message names file/key/line).
"""

from __future__ import annotations

import argparse
import logging
import sys

from trainer.importing.convert import convert_file
from trainer.importing.rows import table_markdown
from trainer.importing.writer import write_import
from trainer.runtime.errors import ConfigError


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m trainer.importing.command", description=__doc__.split("\n\n")[1]
    )
    p.add_argument("source", help="kohya_ss GUI .json or sd-scripts --config_file .toml")
    p.add_argument("--dataset_config", help="sd-scripts --dataset_config .toml")
    p.add_argument("--out", required=True, help="folder for train.json and optimizer.json")
    p.add_argument(
        "--steps_per_epoch",
        type=int,
        help="optimizer steps per epoch (images x repeats / batch / grad accum): needed to convert "
        "max_train_steps and warmup fractions, and to end decaying schedules where kohya does",
    )
    p.add_argument(
        "--write-dataset-settings",
        dest="write_dataset",
        action="store_true",
        help="also write multiply.txt etc. into the dataset folders (never done unasked)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result = convert_file(
            args.source,
            args.dataset_config,
            steps_per_epoch=args.steps_per_epoch,
            write_dataset=args.write_dataset,
        )
        written = write_import(result, args.source, args.out, write_dataset=args.write_dataset)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table_markdown(result.rows))
    print()
    for path in written:
        print(f"wrote {path}")
    lossy = result.lossy_rows()
    if lossy:
        names = ", ".join(r.source for r in lossy)
        logging.getLogger("trainer.importing.command").warning(
            "%d key(s) could not be imported and change what training does: %s (see the table)",
            len(lossy),
            names,
        )
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    sys.exit(main())
