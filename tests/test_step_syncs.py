"""Host syncs and Python work per parameter in the optimizer step (issue 32 items 4 and 5),
counted on CPU.

On a GPU every host sync stalls the queue of kernels: the step is designed to make one (the
finiteness check). Three libraries' habits break that, once per parameter (~880 for SD1.5's
UNet + text encoder): bitsandbytes' `step()` synchronises the device after every parameter
(needed only when something is paged), the fused back pass steps one LR scheduler per parameter
in Python, and Adafactor in relative-step mode compares a tensor in Python per parameter. The
counts here are what a CUDA run would sync: `bitsandbytes.utils.sync_gpu` calls, and
`Tensor.__bool__` / `Tensor.item` calls, inside one backward.

The fixes (trainer/optim/sync_free.py, trainer/optim/fused_backward.py) must not change an
update: the tests after the counts compare them with the libraries' own, bit for bit.
"""

from __future__ import annotations

import json

import bitsandbytes.optim.optimizer as bnb_optimizer
import pytest
import torch
from accelerate import Accelerator

from trainer.config import TrainConfig
from trainer.data.batch import Batch
from trainer.optim import parse_optimizer_json
from trainer.parts.builder import build_components


def _parts(optimizer: dict, **config):
    cfg = TrainConfig(resume_ckpt="builtin:tiny-sd1", batch_size=2, **config)
    opt_file = parse_optimizer_json(json.dumps({"base": optimizer}), "test")
    return build_components(cfg, Accelerator(cpu=True), opt_file=opt_file, total_optimizer_steps=4)


def _loss(parts):
    batch = Batch(["a red circle", "a blue square"], [0, 1], latents=torch.randn(2, 4, 8, 8))
    return parts.step(batch).loss.mean()


@pytest.fixture
def bnb_syncs(monkeypatch):
    calls = []
    real = bnb_optimizer.sync_gpu
    monkeypatch.setattr(bnb_optimizer, "sync_gpu", lambda t: calls.append(1) or real(t))
    return calls


@pytest.mark.parametrize("fused", [False, True], ids=["optimizer set", "fused back pass"])
def test_a_non_paged_8bit_step_makes_no_per_parameter_sync(bnb_syncs, fused):
    parts = _parts({"optimizer": "adamw8bit", "lr": 1e-4}, fused_back_pass=fused)
    parts.optim.backward(_loss(parts), parts.scaler)
    parts.optim.step(parts.scaler)
    trained = sum(c.trainable_count > 0 for c in parts.optim.components.values())
    assert len(bnb_syncs) <= trained, f"{len(bnb_syncs)} device syncs in one optimizer step"


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


def _steps(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: int = 3) -> None:
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        optimizer.step()


def _params() -> list[torch.nn.Parameter]:
    """Above and below bitsandbytes' min_8bit_size (8-bit and fp32 state); a zero one and a tiny
    one (Adafactor: RMS below eps2, the other branch of its step size)."""
    gen = torch.Generator().manual_seed(0)
    return [
        torch.nn.Parameter(torch.randn(96, 64, generator=gen)),
        torch.nn.Parameter(torch.randn(64, generator=gen)),
        torch.nn.Parameter(torch.zeros(32, 8)),
        torch.nn.Parameter(torch.randn(5000, generator=gen) * 1e-5),
    ]


def _assert_same_run(name: str, options: dict, lr: float | None) -> None:
    """The registry's class (trainer/optim/sync_free.py) against the library's, built with the
    same arguments: same weights and state, bit for bit."""
    from trainer.optim import registry

    spec = registry.get_spec(name)
    options = {**spec.defaults, **options}  # merged by the resolution in training
    ours, theirs = _params(), _params()
    built = registry.build_optimizer(spec, ours, lr, options)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(registry, "without_host_syncs", lambda spec, cls: cls)
        reference = registry.build_optimizer(spec, theirs, lr, options)
    assert type(reference) is spec.load_class() and isinstance(built, type(reference))
    assert type(built) is not type(reference)
    _steps(built, ours)
    _steps(reference, theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
        for key, value in built.state[a].items():
            other = reference.state[b][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key


@pytest.mark.parametrize("name", ["adamw8bit", "lion8bit", "lamb8bit", "sgd8bit", "adagrad8bit"])
def test_the_sync_free_bitsandbytes_step_is_the_library_step(bnb_syncs, name):
    _assert_same_run(name, {}, 1e-3)
    assert len(bnb_syncs) == 3 * len(_params())  # all the library's: one per parameter and step


def test_a_paged_optimizer_keeps_the_syncs_paging_needs(bnb_syncs):
    """Paged state migrates asynchronously: bitsandbytes' own step runs, one sync per parameter
    and one at the end."""
    from trainer.optim.registry import build_optimizer, get_spec

    params = _params()
    with pytest.warns(UserWarning, match="Paged optimizers are not supported on CPU"):
        _steps(build_optimizer(get_spec("paged_adamw8bit"), params, 1e-3, {}), params, steps=1)
    assert len(bnb_syncs) == len(params) + 1


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"warmup_init": True},
        {"beta1": 0.9},
        {"relative_step": False, "scale_parameter": True},
        {"weight_decay": 0.1},  # the library's own _get_lr (alpha= reads a tensor anyway)
    ],
    ids=lambda o: ",".join(o) or "relative step",
)
def test_the_sync_free_adafactor_is_the_library_adafactor(options):
    _assert_same_run("adafactor", options, None if options.get("relative_step", True) else 1e-3)


def test_every_parameter_trains_at_the_component_schedule_lr():
    """One schedule per component: each step, every per-parameter optimizer's LR (and
    initial_lr) is what its own scheduler gave it before, and the saved schedule is the one a
    normal optimizer's scheduler saves."""
    from trainer.optim.fused_backward import attach_fused_backward

    def schedule(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3) * 0.9**s)

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    fused = attach_fused_backward(
        list(net.named_parameters()), lambda ps: torch.optim.SGD(ps, lr=0.1), lr_scheduler_factory=schedule
    )
    reference = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    reference_schedule = schedule(reference)
    for _ in range(4):
        groups = [opt.param_groups[0] for opt in fused.optimizers]
        assert {(g["lr"], g["initial_lr"]) for g in groups} == {(reference.param_groups[0]["lr"], 0.1)}
        net(torch.randn(3, 4)).sum().backward()
        reference.step()
        reference_schedule.step()
    saved = fused.state_dict()["params"]
    assert {s["lr_scheduler"]["last_epoch"] for s in saved.values()} == {4}
    assert saved["0.weight"]["lr_scheduler"] == reference_schedule.state_dict()


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
