"""Run by tests/test_distributed.py under torchrun: does each trained parameter's gradient live
inside DDP's bucket (gradient_as_bucket_view), or is it a second copy of it?

Builds the session as training does, records the flat buffer of every bucket DDP all-reduces
(a comm hook that then does the default all-reduce), runs one micro-step's backward, and writes
for this rank how many gradients lie inside a recorded buffer.

Usage: torchrun --nproc_per_node 2 tests/ddp_bucket_worker.py OUT_DIR [--key value ...]
"""

import json
import os
import sys
from pathlib import Path

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.config import load_config  # noqa: E402
from trainer.data.batch import Batch
from trainer.run.session import build_session  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    out = Path(sys.argv[1])
    session = build_session(load_config(str(ROOT / "train.json"), sys.argv[2:]))
    buffers: list[tuple[int, int]] = []  # (start address, bytes) of each bucket's flat buffer

    def record_then_allreduce(state, bucket):
        buffer = bucket.buffer()
        buffers.append((buffer.data_ptr(), buffer.numel() * buffer.element_size()))
        return default_hooks.allreduce_hook(None, bucket)

    report = {"rank": int(os.environ["RANK"])}
    for module in session.trainable_modules().values():
        module.register_comm_hook(state=None, hook=record_then_allreduce)
    batch = Batch(["a red circle", "a blue square"], [0, 1], latents=torch.randn(2, 4, 8, 8))
    session.step(batch).loss.mean().backward()
    for name, module in session.trainable_modules().items():
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        inside = [
            any(start <= g.data_ptr() < start + size for start, size in buffers)
            for g in grads
            if g is not None
        ]
        report[name] = {
            "grads": len(inside),
            "in_bucket": sum(inside),
            "logged": module._get_ddp_logging_data().get("gradient_as_bucket_view"),
        }
    session.close()
    (out / f"rank{report['rank']}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
