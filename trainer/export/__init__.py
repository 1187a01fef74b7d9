"""Artefacts out of a fine-tune: LoRA extraction with its fidelity measured (docs/LORA.md).

* `naming.py`: which layers a LoRA covers, and their kohya / A1111 key names.
* `lora.py`: the maths, pure functions of one layer's change (SVD, ranks, kept energy, factors).
* `extract.py`: base vs tuned, layer by layer: architecture check, changed layers, `ExtractedLora`.
* `probe.py`: the UNet prediction error of base + LoRA against the fine-tune.
* `fidelity.py`: the report (per block kept energy, what no key carries, the probe).
* `lora_file.py`: save precision, metadata, the atomic write.
* `sources.py`: --base / --tuned (any model source, or a checkpoint of this trainer).
* `write.py`: extract, measure, write: shared by the command and `write_checkpoint_lora`.
* `checkpoint_lora.py`: train.json's `extract_lora_rank`, a LoRA in every checkpoint folder
  (handed to the session from above: the checkpoint writer never imports this package).
* `command.py`: the `extract-lora` command (`main(argv) -> int`).

Nothing here is imported at package import.
"""
