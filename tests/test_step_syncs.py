"""Host syncs and Python work per parameter in the optimizer step (issue 32 items 4 and 5),
counted on CPU.

On a GPU every host sync stalls the queue of kernels: the step is designed to make one (the
finiteness check). Three libraries' habits break that, once per parameter (~880 for SD1.5's
UNet + text encoder): bitsandbytes' `step()` synchronises the device after every parameter
(needed only when something is paged), the fused back pass steps one LR scheduler per parameter
in Python, and Adafactor in relative-step mode compares a tensor in Python per parameter. The
counts here are what a CUDA run would sync: `bitsandbytes.utils.sync_gpu` calls, and
`Tensor.__bool__` / `Tensor.item` calls, inside one backward.

Each test is an expected failure until the fix described in its reason lands (files not owned
by this change); `strict` makes a fixed one fail until its mark is removed.
"""

from __future__ import annotations

import json

import bitsandbytes.optim.optimizer as bnb_optimizer
import pytest
import torch
from accelerate import Accelerator

from trainer.builder import build_components
from trainer.config import TrainConfig
from trainer.optim import parse_optimizer_json


def _parts(optimizer: dict, **config):
    cfg = TrainConfig(resume_ckpt="builtin:tiny-sd1", batch_size=2, **config)
    opt_file = parse_optimizer_json(json.dumps({"base": optimizer}), "test")
    return build_components(cfg, Accelerator(cpu=True), opt_file=opt_file, total_optimizer_steps=4)


def _loss(parts):
    batch = {
        "latents": torch.randn(2, 4, 8, 8),
        "captions": ["a red circle", "a blue square"],
        "loss_scale": torch.ones(2),
        "sample_seeds": [0, 1],
    }
    return parts.step(batch).loss.mean()


@pytest.fixture
def bnb_syncs(monkeypatch):
    calls = []
    real = bnb_optimizer.sync_gpu
    monkeypatch.setattr(bnb_optimizer, "sync_gpu", lambda t: calls.append(1) or real(t))
    return calls


@pytest.mark.xfail(
    strict=True,
    reason="issue 32 item 4: bitsandbytes syncs per parameter; fix in trainer/optim/registry.py: "
    "non-paged 8-bit optimizers step without bitsandbytes' per-parameter sync_gpu",
)
@pytest.mark.parametrize("fused", [False, True], ids=["optimizer set", "fused back pass"])
def test_a_non_paged_8bit_step_makes_no_per_parameter_sync(bnb_syncs, fused):
    parts = _parts({"optimizer": "adamw8bit", "lr": 1e-4}, fused_back_pass=fused)
    parts.optim.backward(_loss(parts), parts.scaler)
    parts.optim.step(parts.scaler)
    trained = sum(c.trainable_count > 0 for c in parts.optim.components.values())
    assert len(bnb_syncs) <= trained, f"{len(bnb_syncs)} device syncs in one optimizer step"


@pytest.mark.xfail(
    strict=True,
    reason="issue 32 item 4: one LR scheduler per parameter; fix in trainer/optim/fused_backward.py: "
    "one scheduler per component, its LR copied to the per-parameter optimizers",
)
def test_the_fused_back_pass_steps_one_schedule_per_component(monkeypatch):
    parts = _parts({"optimizer": "adamw", "lr": 1e-4, "lr_scheduler": "cosine"}, fused_back_pass=True)
    steps = []
    real = torch.optim.lr_scheduler.LRScheduler.step
    monkeypatch.setattr(
        torch.optim.lr_scheduler.LRScheduler, "step", lambda s, *a: steps.append(1) or real(s, *a)
    )
    parts.optim.backward(_loss(parts))
    parts.optim.step()
    components = len(parts.optim.components)
    assert len(steps) <= components, f"{len(steps)} scheduler steps in one backward ({components} components)"


@pytest.mark.xfail(
    strict=True,
    reason="issue 32 item 4: Adafactor's relative step reads a tensor per parameter; fix in "
    "trainer/optim/registry.py: keep its RMS-based step size on the device",
)
def test_adafactor_relative_step_reads_no_tensor_per_parameter_in_backward(monkeypatch):
    parts = _parts({"optimizer": "adafactor", "lr": None, "lr_scheduler": "adafactor"}, fused_back_pass=True)
    loss = _loss(parts)
    reads = []
    for name in ("__bool__", "item"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _r=real: reads.append(1) or _r(t, *a))
    parts.optim.backward(loss)
    monkeypatch.undo()
    assert len(reads) <= 1, f"{len(reads)} host reads in one backward (one is the finiteness check)"


class _PeakBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """The largest single tensor allocated by any op inside the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def test_gradient_norm_tracking_copies_no_gradient():
    """Tracking the gradient norm in the fused back pass must not allocate a tensor the size of
    a gradient: bf16 gradients were copied to fp32 and squared (6 bytes per element)."""
    from trainer.optim.fused_backward import attach_fused_backward

    weight = torch.nn.Parameter(torch.randn(1 << 20, dtype=torch.bfloat16))
    attach_fused_backward(
        [weight], lambda ps: torch.optim.SGD(ps, lr=1e-3), lr_scheduler_factory=None, track_grad_norm=True
    )
    loss = (weight * weight).sum()  # bf16 throughout: autograd itself allocates nothing above the gradient
    with _PeakBytes() as mode:
        loss.backward()
    gradient = weight.numel() * weight.element_size()
    assert mode.largest <= gradient, (mode.largest, gradient)  # the gradient itself, nothing larger
