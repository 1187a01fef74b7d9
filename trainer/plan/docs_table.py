"""docs/REAL_MODELS.md's memory table, generated from the plan of each row's recipe.

    python -m trainer.plan.docs_table [--measured gpu_suite_memory.json]

Each row is a recipe (an example train.json plus overrides, on the full-size built-in
architecture so that nothing needs downloading) planned for CUDA. A row says "planned" until
`--measured` gives a measured peak for its label (a JSON object label -> bytes, e.g. from
bench/gpu_suite.py's memory phase); then both figures stand side by side, with their ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from trainer.config import load_config
from trainer.optim import load_optimizer_file
from trainer.plan.memory import Evaluator
from trainer.plan.model import GIB

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Row:
    label: str
    config: str  # train.json under the repository root
    overrides: tuple[str, ...]
    what: str


_SD15 = ("--resume_ckpt", "builtin:sd15-arch")
_SD21 = ("--resume_ckpt", "builtin:sd21-arch", "--optimizer_config", "optimizerSD21.json")
ROWS = (
    Row("sd15 lowvram", "examples/train/lowvram_sd15.json", (), "`lowvram_sd15.json` (adamw8bit, checkpointing, fused back pass, bf16 weights, cached latents), batch 1"),
    Row("sd15 8bit bs2", "examples/train/sd15_single_file.json", (*_SD15, "--grad_accum", "1"), "adamw8bit + checkpointing + bf16 autocast + cached latents, batch 2"),
    Row("sd15 8bit bs4", "examples/train/sd15_single_file.json", (*_SD15, "--batch_size", "4", "--grad_accum", "1"), "the same, batch 4"),
    Row("sd15 adamw bs4", "examples/train/sd15_single_file.json", (*_SD15, "--batch_size", "4", "--grad_accum", "1", "--optimizer_config", "OPT:adamw"), "fp32 AdamW states + checkpointing, batch 4"),
    Row("sd15 fast bs4", "examples/train/fast_sd15.json", ("--batch_size", "4", "--compile", "false", "--optimizer_config", "OPT:adamw"), "`fast_sd15.json` without compile (AdamW, no checkpointing), batch 4"),
    Row("sd21 lowvram", "examples/train/lowvram_sd15.json", (*_SD21, "--resolution", "768", "--prediction_type", "v_prediction"), "the low-VRAM recipe on SD2.1-v at 768 px (optimizerSD21.json: last two text-encoder layers)"),
    Row("sd21 8bit", "examples/train/sd21v_single_file.json", (*_SD21, "--grad_accum", "1"), "`sd21v_single_file.json` (adamw8bit, checkpointing, bf16 autocast), batch 1"),
)  # fmt: skip


def row_config(row: Row, workdir: Path):
    """The row's TrainConfig (an `OPT:<name>` optimizer_config is a minimal optimizer.json)."""
    overrides = list(row.overrides)
    for i, value in enumerate(overrides):
        if value.startswith("OPT:"):
            path = workdir / f"{value[4:]}.json"
            path.write_text(json.dumps({"base": {"optimizer": value[4:], "lr": 1e-6}}))
            overrides[i] = str(path)
    return load_config(str(ROOT / row.config), overrides)


def table_markdown(rows: tuple[Row, ...], measured: dict[str, int], workdir: Path) -> str:
    lines = [
        "| recipe | model, bucket | peak (plan) | measured | status |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        cfg = row_config(row, workdir)
        evaluation = Evaluator("cuda")(cfg, load_optimizer_file(cfg.optimizer_config))
        total = sum(evaluation.categories.values())
        model = cfg.resume_ckpt.removeprefix("builtin:").replace("-arch", "")
        where = f"{model}, {evaluation.settings['bucket']}"
        if row.label in measured:
            got = measured[row.label]
            cells = f"{got / GIB:.2f} GiB | measured (plan/measured {total / got:.2f})"
        else:
            cells = "- | planned"
        lines.append(f"| {row.what} | {where} | {total / GIB:.2f} GiB | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.plan.docs_table", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--measured", type=Path, help="JSON object: row label -> measured peak bytes")
    parser.add_argument(
        "--workdir", type=Path, help="where the minimal optimizer.json files go (default: a temporary folder)"
    )
    args = parser.parse_args(argv)
    measured = json.loads(args.measured.read_text()) if args.measured else {}
    with tempfile.TemporaryDirectory() as scratch:  # never a stray file in the caller's folder
        print(table_markdown(ROWS, measured, args.workdir or Path(scratch)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
