"""sdtrainer: full fine-tuning of Stable Diffusion 1.x / 2.x (UNet + CLIP text encoder).

Reads EveryDream2's train.json / optimizer.json and dataset conventions unchanged.
"""

__version__ = "0.1.0"

from trainer.runtime.console import hide_known_harmless_warnings

# Before any command imports bitsandbytes / transformers: their known-harmless import-time
# warnings (exact messages, listed with the reason in trainer/runtime/console.py) stay off the console
# of every command (train, preview, convert, bench); their other warnings still show.
hide_known_harmless_warnings()
