"""sdtrainer: full fine-tuning of Stable Diffusion 1.x / 2.x (UNet + CLIP text encoder).

Reads EveryDream2's train.json / optimizer.json and dataset conventions unchanged.
"""

__version__ = "0.1.0"
