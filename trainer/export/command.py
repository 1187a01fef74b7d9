"""`sdtrainer extract-lora` / `python -m trainer.extract_lora`: a fine-tune as a LoRA file.

    python -m trainer.extract_lora --base BASE --tuned CHECKPOINT --out my-lora.safetensors --rank 32

Every setting is checked before a model loads; the fidelity report is printed and written
beside the file (docs/LORA.md). Exit codes: 0 written, 2 bad input (flag, path, architecture
mismatch, a tuned model identical to the base: nothing written).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from trainer.export.extract import RankSettings
from trainer.export.lora_file import SAVE_PRECISIONS
from trainer.export.probe import Probe
from trainer.export.sources import load_source, resolve_source
from trainer.export.write import extract_to_file, provenance_of, resolve_device
from trainer.runtime.errors import ConfigError, TrainerError

log = logging.getLogger("trainer.extract_lora")

WHERE_IT_GOES = """where the file goes:
  A1111 / Forge: stable-diffusion-webui/models/Lora/, then <lora:{stem}:1> in the prompt
  ComfyUI: ComfyUI/models/loras/, then a 'Load LoRA' node between the checkpoint loader and the sampler
  diffusers: pipe.load_lora_weights("{path}") on the base model's pipeline"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer.extract_lora",
        description="Extract a LoRA (kohya / A1111 layout) from a full fine-tune, and report how much of "
        "the fine-tune it keeps.",
    )
    p.add_argument("--base", required=True, help="the model the fine-tune started from (any model source)")
    p.add_argument(
        "--tuned",
        required=True,
        help="checkpoint folder of this trainer, its .safetensors, or any model source",
    )
    p.add_argument("--out", required=True, type=Path, help="the LoRA file to write (.safetensors)")
    p.add_argument(
        "--rank", type=int, default=32, help="rank of linear layers (with --keep: the cap); default 32"
    )
    p.add_argument(
        "--conv_rank",
        type=int,
        default=0,
        help="rank of 3x3 convolutions (LoCon; with --keep: the cap); 0, the default, leaves them out",
    )
    p.add_argument(
        "--keep",
        type=float,
        help="dynamic rank: each layer takes the smallest rank keeping this fraction of its change "
        "(e.g. 0.95), at most --rank / --conv_rank",
    )
    p.add_argument("--save_precision", choices=sorted(SAVE_PRECISIONS), default="fp16")
    p.add_argument(
        "--device", default="auto", help="where the SVD runs: auto (CUDA when there is one), cpu, cuda"
    )
    p.add_argument(
        "--probe_size",
        type=int,
        help="latent side of the prediction-error probe (default: the UNet's, at most 32)",
    )
    p.add_argument("--no_probe", action="store_true", help="skip the UNet prediction-error measurement")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
    return p


def settings_from(args: argparse.Namespace) -> tuple[RankSettings, Probe | None]:
    """Check the numbers (each error names its flag) before anything loads."""
    if args.rank < 1:
        raise ConfigError(f"--rank {args.rank}: a LoRA needs rank 1 or more")
    if args.conv_rank < 0:
        raise ConfigError(f"--conv_rank {args.conv_rank}: give 0 (no conv layers) or a rank of 1 or more")
    if args.keep is not None and not 0.0 < args.keep <= 1.0:
        raise ConfigError(f"--keep {args.keep}: give the fraction of each layer's change to keep, in (0, 1]")
    if args.probe_size is not None and args.probe_size < 1:
        raise ConfigError(f"--probe_size {args.probe_size}: give a latent side of 1 or more")
    settings = RankSettings(rank=args.rank, conv_rank=args.conv_rank, keep=args.keep)
    return settings, None if args.no_probe else Probe(latent_size=args.probe_size)


def check_output(out: Path, overwrite: bool) -> Path:
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out {out}: the LoRA is written as .safetensors; name the file *.safetensors")
    if out.exists() and not overwrite:
        raise ConfigError(f"--out {out} exists; choose another name or add --overwrite")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name")
    return out


def run(args: argparse.Namespace) -> int:
    settings, probe = settings_from(args)
    out = check_output(args.out, args.overwrite)
    device = resolve_device(args.device)
    base_source, tuned_source = resolve_source(args.base, "--base"), resolve_source(args.tuned, "--tuned")
    base, tuned = load_source(base_source), load_source(tuned_source)  # only now do models load
    provenance = provenance_of(
        base.model,
        tuned.model,
        base_name=base_source.name,
        tuned_name=tuned_source.name,
        step=tuned_source.step,
        base_file=base_source.single_file,
    )
    outcome = extract_to_file(
        base.model,
        tuned.model,
        out,
        settings,
        provenance,
        precision=args.save_precision,
        device=device,
        probe=probe,
        measure=probe is not None,
    )
    print(outcome.report.format())
    size = out.stat().st_size / 2**20
    print(
        f"wrote {out} ({outcome.keys} tensors, {size:.1f} MiB, {args.save_precision}); report: "
        f"{outcome.report_files[0]}"
    )
    print(WHERE_IT_GOES.format(stem=out.stem, path=out))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
        )
    try:
        return run(args)
    except TrainerError as exc:
        log.error("%s", exc)
        return exc.exit_code
