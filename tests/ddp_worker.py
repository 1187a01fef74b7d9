"""Run by tests/test_distributed.py under torchrun: train, then write this rank's weight digest.

Usage: torchrun --nproc_per_node N tests/ddp_worker.py OUT_DIR [--key value ...]
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.config import load_config  # noqa: E402
from trainer.run.loop import train  # noqa: E402
from trainer.run.session import build_session  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def digest(module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(
            tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes()
        )  # any dtype
    return h.hexdigest()


def main() -> None:
    out = Path(sys.argv[1])
    cfg = load_config(str(ROOT / "train.json"), sys.argv[2:])
    session = build_session(cfg)
    summary = train(session)
    rank = int(os.environ.get("RANK", "0"))
    report = {
        "rank": rank,
        "status": summary.status,
        "global_step": summary.global_step,
        "seed": session.cfg.seed,
        "unet": digest(session.model.unet),
        "text_encoder": digest(session.model.text_encoder),
        "run": str(session.run.path),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
