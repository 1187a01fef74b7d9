"""sdtrainer: full fine-tuning of Stable Diffusion 1.x / 2.x (UNet + CLIP text encoder).

Reads EveryDream2's train.json / optimizer.json and dataset conventions unchanged.
"""

__version__ = "0.1.0"

import os

# Nothing is downloaded at run time, and nothing asks the network: every model is a local path
# or built in. Offline unless the environment says otherwise, set before any library reads it,
# because an import alone would: bitsandbytes asks the Hub for a kernel when imported on CPUs
# with AVX512-BF16 (tests/test_offline.py).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from trainer.runtime.console import hide_known_harmless_warnings  # noqa: E402 (after the line above)

# Before any command imports bitsandbytes / transformers: their known-harmless import-time
# warnings (exact messages, listed with the reason in trainer/runtime/console.py) stay off the console
# of every command (train, preview, convert, bench); their other warnings still show.
hide_known_harmless_warnings()
