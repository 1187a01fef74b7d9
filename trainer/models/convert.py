"""Convert between single-file (original ldm layout) checkpoints and diffusers folders.

python -m trainer.models.convert model.safetensors out_folder        # file -> diffusers
python -m trainer.models.convert pipeline_folder out.safetensors --half  # diffusers -> file
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from trainer.models.loading import load_model
from trainer.models.saving import save_pipeline
from trainer.models.single_file import save_single_file
from trainer.runtime.errors import ModelLoadError


def convert_file(src: str, dst: str, *, half: bool) -> None:
    """Convert between a single file and a diffusers folder (either way), or re-export.

    `dst` ending in `.safetensors` gets a single file; anything else becomes a pipeline folder.
    `half` stores fp16 weights.
    """
    dst_path = Path(dst).expanduser()
    if dst_path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        raise ModelLoadError(f"refusing to write pickle format {dst_path}; write a .safetensors file instead")
    components = load_model(src, dtype=torch.float16 if half else torch.float32)
    if dst_path.suffix == ".safetensors":
        save_single_file(components, dst_path, half=half)
    else:
        if dst_path.exists() and any(dst_path.iterdir()):
            raise ModelLoadError(f"output folder {dst_path} exists and is not empty; choose a new folder")
        save_pipeline(components, dst_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.models.convert", description=__doc__.splitlines()[0]
    )
    parser.add_argument("src", help="diffusers folder, .safetensors/.ckpt file, or builtin:NAME")
    parser.add_argument("dst", help="output: NAME.safetensors for a single file, otherwise a new folder")
    parser.add_argument("--half", action="store_true", help="store fp16 weights")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        convert_file(args.src, args.dst, half=args.half)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
