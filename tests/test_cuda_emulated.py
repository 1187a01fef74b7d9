"""GPU-only code paths checked on CPU by emulating the device (mocked torch.cuda functions,
fp16/bf16 modules on CPU). Issue 22 items 2-6: each test here failed before its fix."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from tests.test_step import CAPTIONS, make_step, models, pixel_batch  # noqa: F401 (fixture)
from trainer.checkpointing import state as state_mod
from trainer.data.batch import Batch


class FakeCuda:
    """One visible GPU: records set_rng_state calls and refuses device indices past the count."""

    def __init__(self, monkeypatch, *, count: int = 1, current: int = 0):
        self.count, self.current, self.set_calls = count, current, []
        self.states = {i: torch.full((16,), i, dtype=torch.uint8) for i in range(count)}
        for mod in (torch.cuda, torch.cuda.random):
            monkeypatch.setattr(mod, "set_rng_state", self.set_rng_state, raising=False)
            monkeypatch.setattr(mod, "get_rng_state", self.get_rng_state, raising=False)
            monkeypatch.setattr(mod, "device_count", lambda: self.count, raising=False)
            monkeypatch.setattr(mod, "current_device", lambda: self.current, raising=False)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def _check(self, device) -> int:
        index = device.index if isinstance(device, torch.device) else int(device)
        if index >= self.count:
            raise RuntimeError(f"invalid device ordinal {index} (visible: {self.count})")
        return index

    def get_rng_state(self, device="cuda"):
        return self.states[self._check(self.current if device == "cuda" else device)].clone()

    def set_rng_state(self, new_state, device="cuda"):
        index = self._check(self.current if device == "cuda" else device)
        self.set_calls.append(index)
        self.states[index] = new_state.clone()


def test_cuda_rng_state_saved_on_eight_gpus_resumes_on_one(monkeypatch, caplog):
    cpu_state = state_mod.capture_global_rng()  # before faking: no CUDA entry on this machine
    fake = FakeCuda(monkeypatch, count=1)
    saved = {**cpu_state, "cuda": [torch.full((16,), 100 + i, dtype=torch.uint8) for i in range(8)]}
    with caplog.at_level(logging.WARNING):
        state_mod.restore_global_rng(saved)  # checkpoint of a process that saw 8 GPUs
    assert fake.set_calls == [0]
    assert torch.equal(fake.states[0], saved["cuda"][0])
    assert "8 device(s), this process sees 1" in caplog.text


def test_cuda_rng_state_is_this_process_device_only(monkeypatch):
    fake = FakeCuda(monkeypatch, count=2, current=1)
    captured = state_mod.capture_global_rng()
    assert torch.equal(captured["cuda"], fake.states[1])  # one state, not a list of every GPU
    fake.states[1] = torch.zeros(16, dtype=torch.uint8)
    fake.count = 1  # resumed where the process sees a single GPU as its device 0
    fake.current = 0
    state_mod.restore_global_rng(captured)
    assert fake.set_calls == [0] and torch.equal(fake.states[0], captured["cuda"])


def _fake_gpu(monkeypatch, major: int) -> None:
    """A visible GPU of compute capability `major`.x that can create bf16 tensors (emulation)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(major=major))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)


@pytest.mark.parametrize(
    ("major", "expected"), [(7, torch.float16), (8, torch.bfloat16), (9, torch.bfloat16)]
)
def test_auto_precision_uses_fp16_on_gpus_without_bf16_hardware(monkeypatch, major, expected):
    from trainer.parts.precision import make_grad_scaler, resolve_autocast_dtype

    _fake_gpu(monkeypatch, major)  # 7 = T4 / V100: bf16 only emulated
    cuda = torch.device("cuda")
    dtype = resolve_autocast_dtype("auto", False, cuda)
    assert dtype == expected
    assert (make_grad_scaler(dtype, cuda) is not None) == (expected == torch.float16)


def test_trainable_text_encoder_builds_no_graph_under_no_grad(models):  # noqa: F811
    """Validation runs the step under no_grad: a trainable text encoder must not re-enable grad."""
    step = make_step(models)
    assert any(p.requires_grad for p in models.te.parameters())
    with torch.no_grad():
        emb = step._text_embeddings(CAPTIONS, [])
        out = step(pixel_batch())
    assert not emb.requires_grad and emb.grad_fn is None
    assert not out.loss.requires_grad
    assert step._text_embeddings(CAPTIONS, []).requires_grad  # training keeps its graph


@pytest.fixture
def restore_cuda_backends():
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
    )
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = (
        saved
    )


@pytest.mark.parametrize("allow_tf32", [True, False])
def test_cuda_math_modes_follow_the_config(restore_cuda_backends, allow_tf32):
    from trainer.parts.precision import configure_cuda_backends

    torch.backends.cuda.matmul.allow_tf32 = not allow_tf32
    torch.backends.cudnn.allow_tf32 = not allow_tf32
    torch.backends.cudnn.benchmark = False
    line = configure_cuda_backends(torch.device("cuda"), allow_tf32=allow_tf32)
    assert torch.backends.cuda.matmul.allow_tf32 is allow_tf32
    assert torch.backends.cudnn.allow_tf32 is allow_tf32
    assert torch.backends.cudnn.benchmark is True
    assert line == f"TF32 matmul/conv {'on' if allow_tf32 else 'off'}, cudnn.benchmark on"
    configure_cuda_backends(torch.device("cuda"), allow_tf32=allow_tf32, benchmark=False)  # deterministic
    assert torch.backends.cudnn.benchmark is False
    assert configure_cuda_backends(torch.device("cpu"), allow_tf32=allow_tf32) == ""


def test_allow_tf32_defaults_on():
    from trainer.config import TrainConfig

    assert TrainConfig().allow_tf32 is True


@pytest.mark.parametrize("fused_back_pass", [False, True])
def test_channels_last_survives_the_8bit_optimizer_step(fused_back_pass):
    """bitsandbytes makes parameters contiguous in its update; the layout and storage must stay."""
    import json

    from trainer.optim import TrainOptimSettings, build_optimizers, parse_optimizer_json
    from trainer.parts.builder import wrap_optimizer_set

    torch.manual_seed(0)
    unet = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.Conv2d(64, 4, 3, padding=1))
    te = torch.nn.Linear(4, 4)
    opt_file = parse_optimizer_json(json.dumps({"base": {"optimizer": "adamw8bit", "lr": 1e-3}}), "test")
    optim = build_optimizers(
        opt_file,
        TrainOptimSettings(lr=1e-3, disable_textenc_training=True),
        unet=unet,
        text_encoder=te,
        total_optimizer_steps=4,
    )
    unet.to(memory_format=torch.channels_last)
    optim = wrap_optimizer_set(
        optim, fused_back_pass=fused_back_pass, uses_grad_scaler=False, channels_last=True
    )
    weight = unet[0].weight
    ptr, before = weight.data_ptr(), weight.detach().clone()
    x = torch.randn(2, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        unet(x).square().mean().backward()
        optim.step(None)
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert weight.data_ptr() == ptr  # same storage: compiled graphs and CUDA graphs stay valid
    assert not torch.equal(weight, before)  # and the update landed in it


def test_per_sample_noise_is_moved_in_one_copy_with_unchanged_values(models, monkeypatch):  # noqa: F811
    """Item 8: the per-sample draws (so N processes == 1 process) arrive in one host->device copy."""
    from trainer.step import diffusion as D

    step = make_step(models, zero_frequency_noise_ratio=0.1)
    captured, copies = {}, []
    monkeypatch.setattr(
        step, "_loss", lambda batch, lat, noise, t, emb, perturbation=None: captured.update(noise=noise, t=t)
    )
    real = step._to_device
    monkeypatch.setattr(step, "_to_device", lambda host: copies.append(host.shape) or real(host))
    latents = torch.zeros(3, 4, 8, 8)
    step(Batch(["a", "b", "c"], [5, 6, 7], latents=latents))
    assert len(copies) == 1  # noise and timesteps packed together
    for i, seed in enumerate([5, 6, 7]):
        g = torch.Generator().manual_seed(seed)
        noise = D.sample_noise((1, 4, 8, 8), generator=g, device="cpu", zero_frequency_noise_ratio=0.1)
        t = D.sample_timesteps(1, start=0, end=1000, generator=g, device="cpu")
        assert torch.equal(captured["noise"][i : i + 1], noise) and captured["t"][i] == t[0]
    assert captured["t"].dtype == torch.long
