"""`python -m trainer.extract_lora --base BASE --tuned TUNED --out FILE [--rank R] ...`
(= `sdtrainer extract-lora ...`)

Extracts a LoRA from a full fine-tune and reports how much of it the LoRA keeps
(`trainer.export.command`; docs/LORA.md). The CPU thread settings are applied before torch
loads, as for training (trainer/runtime/threads.py: the SVDs and the probe are many short parallel
regions, which a busy machine slows badly with OpenMP's default spinning).
"""

import sys

from trainer.runtime.threads import configure_threads


def main(argv: list[str] | None = None) -> int:
    configure_threads()  # does nothing when torch is already loaded (the importing program owns it)
    from trainer.export.command import main as extract  # torch loads here, after the thread settings

    return extract(argv)


if __name__ == "__main__":
    sys.exit(main())
