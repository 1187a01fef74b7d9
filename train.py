"""Train a Stable Diffusion model: `python train.py --config train.json [--key value ...]`.

A thin entry point; everything lives in the `trainer` package (trainer.cli.main).
"""

import sys

from trainer.cli import main

if __name__ == "__main__":
    sys.exit(main())
