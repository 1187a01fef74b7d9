"""Convert between single-file (original ldm layout) checkpoints and diffusers folders.

python -m trainer.models.convert model.safetensors out_folder        # file -> diffusers
python -m trainer.models.convert pipeline_folder out.safetensors --half  # diffusers -> file
"""

from __future__ import annotations

import argparse
import logging
import sys

from trainer.errors import ModelLoadError
from trainer.models.saving import convert_file


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
