"""Preview a dataset the way training will see it, without loading a model.

    python -m trainer.data.preview --config train.json [--json]
    python -m trainer.data.preview --data_root DIR --resolution 512 [--batch_size N]
        [--grad_accum N] [--validation_config F] [--json]

With `--config`, the data settings come from the train.json (flags given as well win).

Prints the image count, per-bucket image and batch counts, caption statistics, repeats, the
validation split and the problems (a few of each kind, with a count of the rest; warnings
repeated for many images are summarised the same way); `--json` prints the same as one JSON
object that also lists every image and every problem.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from collections import Counter
from dataclasses import replace

from trainer.config import build_config, read_json_config
from trainer.data.dataset import UNDERSIZED_PREFIX, DataSettings, LoadedDataset, load_data
from trainer.runtime.console import RepeatLimiter
from trainer.runtime.errors import ConfigError, TrainerError


def build_report(plan: LoadedDataset) -> dict:
    """Everything the preview shows, as plain JSON-able data."""
    epoch = plan.epoch_plan(0)
    batches_by_bucket = Counter(batch[0].bucket for batch in epoch.batches)
    samples_by_bucket = Counter(ref.bucket for batch in epoch.batches for ref in batch)
    texts = [it.caption.text for it in plan.train_items]
    tag_counts = [len(it.caption.tags) for it in plan.train_items]
    return {
        "settings": {
            "data_root": plan.settings.data_root,
            "resolution": plan.settings.resolution,
            "batch_size": plan.settings.batch_size,
            "grad_accum": plan.settings.grad_accum,
            "seed": plan.settings.seed,
        },
        "image_count": len(plan.train_items),
        "batches_per_epoch": len(epoch.batches),
        "optimizer_steps_per_epoch": len(epoch.windows),
        "samples_per_epoch": sum(len(b) for b in epoch.batches),
        "buckets": [
            {
                "bucket": [w, h],
                "images": n,
                "samples_epoch0": samples_by_bucket[(w, h)],
                "batches_epoch0": batches_by_bucket[(w, h)],
            }
            for (w, h), n in plan.bucket_counts.items()
        ],
        "captions": {
            "unique": len(set(texts)),
            "empty": sum(1 for t in texts if not t.strip()),
            "mean_chars": round(statistics.fmean(len(t) for t in texts), 1) if texts else 0,
            "max_chars": max((len(t) for t in texts), default=0),
            "with_tags": sum(1 for n in tag_counts if n),
            "mean_tags": round(statistics.fmean(tag_counts), 2) if tag_counts else 0,
        },
        "repeats": {f"{m:g}": n for m, n in sorted(Counter(it.multiply for it in plan.train_items).items())},
        "validation": {name: [it.path for it in items] for name, items in plan.val_sets.items()},
        "stabilize": [it.path for it in plan.stabilize_items],
        "masks": plan.mask_report.as_dict() if plan.mask_report is not None else None,
        "problems": [
            {
                "path": p.path,
                "reason": p.reason,
                "severity": "warning" if p.reason.startswith(UNDERSIZED_PREFIX) else "skipped",
            }
            for p in plan.problems
        ],
        "images": [
            {
                "path": it.path,
                "size": [it.width, it.height],
                "bucket": list(bucket),
                "caption": it.caption.text,
                "multiply": it.multiply,
                "flip_p": it.flip_p,
                "batch_id": it.batch_id,
                "loss_scale": it.loss_scale,
            }
            for it, bucket in zip(plan.train_items, plan.item_buckets, strict=True)
        ],
    }


def format_report(report: dict) -> str:
    """Human-readable text of `build_report`'s result."""
    s = report["settings"]
    lines = [
        f"{report['image_count']} training images in {s['data_root']} at resolution {s['resolution']}",
        f"batch_size {s['batch_size']}, grad_accum {s['grad_accum']}: {report['batches_per_epoch']} batches, "
        f"{report['optimizer_steps_per_epoch']} optimizer steps, {report['samples_per_epoch']} samples per epoch",
        "buckets (w x h: images / samples / batches in epoch 0):",
    ]
    for b in report["buckets"]:
        w, h = b["bucket"]
        lines.append(
            f"  {w:>5} x {h:<5} {b['images']:>6} / {b['samples_epoch0']:>6} / {b['batches_epoch0']:>5}"
        )
    c = report["captions"]
    lines.append(
        f"captions: {c['unique']} unique, {c['empty']} empty, mean {c['mean_chars']} chars (max {c['max_chars']}), "
        f"{c['with_tags']} with tags (mean {c['mean_tags']} tags)"
    )
    lines.append(
        "repeats (multiply: images): " + ", ".join(f"{m}: {n}" for m, n in report["repeats"].items())
    )
    for name, paths in report["validation"].items():
        lines.append(f"validation set {name!r}: {len(paths)} images")
    if report["stabilize"]:
        lines.append(f"stabilize-train set: {len(report['stabilize'])} images")
    lines.extend(_mask_lines(report["masks"]))
    lines.append(f"problems: {len(report['problems'])}")
    lines.extend(_problem_lines(report["problems"]))
    return "\n".join(lines)


def _mask_lines(masks: dict | None, keep: int = 3) -> list[str]:
    """masked_loss: how many images have a mask; the ones without (full weight), listed once."""
    if masks is None:
        return []
    missing = masks["without_mask"]
    lines = [
        f"masks ({masks['source']}): {masks['with_mask']} with a mask, {len(missing)} without (full weight)"
    ]
    lines.extend(f"  no mask: {path}" for path in missing[:keep])
    if len(missing) > keep:
        lines.append(f"  ... and {len(missing) - keep} more without a mask (--json lists all)")
    return lines


def _problem_lines(problems: list[dict], keep: int = 3) -> list[str]:
    """A few problems of each kind (the reason up to its first ':'), then how many more."""
    by_kind: dict[str, list[dict]] = {}
    for p in problems:
        by_kind.setdefault(p["reason"].split(":")[0], []).append(p)
    lines: list[str] = []
    for kind, group in by_kind.items():
        lines.extend(f"  [{p['severity']}] {p['path']}: {p['reason']}" for p in group[:keep])
        if len(group) > keep:
            lines.append(f"  ... and {len(group) - keep} more '{kind}' (--json lists all)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.data.preview", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--config", help="a train.json: take data_root, resolution, batch_size, ... from it")
    parser.add_argument("--data_root", nargs="+", help="folder(s) or .json manifest(s)")
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--batch_size", type=int)
    parser.add_argument("--grad_accum", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--validation_config", default=None)
    parser.add_argument("--masked_loss", action="store_true", help="report each image's loss mask")
    parser.add_argument("--mask_from_alpha", action="store_true", help="masks from the alpha channel")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    repeats = RepeatLimiter()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    console.addFilter(repeats)
    logging.getLogger().addHandler(console)
    try:
        report = build_report(load_data(_settings(args)))
    except TrainerError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    finally:
        logging.getLogger().removeHandler(console)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    for line in repeats.summary():
        print(line, file=sys.stderr)
    return 0


def _settings(args) -> DataSettings:
    """Flags over the train.json (when given) over the preview's defaults, read and checked as
    train.json is (TrainConfig: every range and rule once, errors naming the key)."""
    if not args.config and not args.data_root:
        raise ConfigError("give --config train.json or --data_root DIR")
    keys = ("resolution", "batch_size", "grad_accum", "seed", "validation_config")
    flags = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    if args.data_root:
        flags["data_root"] = args.data_root[0] if len(args.data_root) == 1 else list(args.data_root)
    flags |= {k: True for k in ("masked_loss", "mask_from_alpha") if getattr(args, k)}
    if flags.get("mask_from_alpha"):
        flags["masked_loss"] = True
    from_file = read_json_config(args.config) if args.config else {"batch_size": 1}
    cfg = build_config(from_file, flags, source=args.config or "defaults")
    return replace(DataSettings.from_config(cfg), scan_cache=None)  # a preview writes nothing


if __name__ == "__main__":
    sys.exit(main())
