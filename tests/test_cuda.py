"""What only a CUDA GPU can check (issue 18). Marked `cuda`: skipped, and counted as skipped,
without one; `python bench/gpu_suite.py` runs them (`pytest -m cuda`) on the GPU machine.

Tiny built-in models, 64 px, a few steps: the whole file takes about a minute on a GPU.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import (
    assert_bitwise_equal,
    checkpoint_dirs,
    copy_images,
    pipeline_weights,
    train_in_process,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_suite.py runs it)"),
]

EIGHT_BIT = [
    "adamw8bit",
    "adam8bit",
    "lion8bit",
    "sgd8bit",
    "rmsprop8bit",
    "adagrad8bit",
    "lamb8bit",
    "lars8bit",
]
PAGED = ["paged_adamw", "paged_adamw8bit", "paged_adam", "paged_adam8bit", "paged_lion", "paged_lion8bit"]


def _tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    # Tensors of >= 4096 elements get 8-bit state (bitsandbytes' min_8bit_size).
    return torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 4)).cuda()


def _steps(net, opt, n: int, seed: int = 0) -> None:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for _ in range(n):
        x = torch.randn(16, 128, device="cuda", generator=gen)
        net(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", EIGHT_BIT + PAGED)
def test_8bit_and_paged_optimizers_step_and_round_trip_their_state(name):
    """Two steps, save the state, load it into a fresh optimizer: the next steps are identical."""
    from trainer.optim.registry import build_optimizer, get_spec

    spec = get_spec(name)
    options = {"momentum": 0.9} if name in ("sgd8bit", "lars8bit", "rmsprop8bit") else {}
    net = _tiny_net()
    before = [p.detach().clone() for p in net.parameters()]
    opt = build_optimizer(spec, list(net.parameters()), 1e-3, options)
    _steps(net, opt, 2)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    state = opt.state_dict()
    twin = _tiny_net()
    twin.load_state_dict(net.state_dict())
    twin_opt = build_optimizer(spec, list(twin.parameters()), 1e-3, options)
    twin_opt.load_state_dict(state)
    _steps(net, opt, 2, seed=1)
    _steps(twin, twin_opt, 2, seed=1)
    for a, b in zip(net.parameters(), twin.parameters(), strict=True):
        # LAMB/LARS reduce norms with atomics: equal up to float rounding, not bitwise.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if "8bit" in name:
        assert any(
            t.dtype == torch.uint8 for s in opt.state.values() for t in s.values() if torch.is_tensor(t)
        )


def _opt_file(tmp_path, optimizer: str = "adamw", lr: float = 2e-4) -> str:
    path = tmp_path / f"{optimizer}.json"
    path.write_text(json.dumps({"base": {"optimizer": optimizer, "lr": lr}, "text_encoder_overrides": None}))
    return str(path)


RUN = dict(max_epochs=1, batch_size=2, resolution=64, lr=None, cond_dropout=0.0)


def _train(tmp_path, **overrides):
    data = copy_images(tmp_path / "data", 8)
    settings = {**RUN, "data_root": data, "optimizer_config": _opt_file(tmp_path), **overrides}
    return train_in_process(tmp_path, **settings)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains(tmp_path, precision):
    summary, session = _train(tmp_path, mixed_precision=precision, project_name=precision)
    assert summary.status == "finished" and summary.global_step == 4 and summary.nonfinite_steps == 0
    assert summary.final_loss is not None and summary.final_loss == summary.final_loss  # finite, not NaN
    assert (session.scaler is not None) == (precision == "fp16")
    assert session.model.unet.device.type == "cuda"


def test_grad_scaler_skips_a_planted_inf_and_halves_the_scale():
    from trainer.optim import TrainOptimSettings, build_optimizers, parse_optimizer_json
    from trainer.parts.precision import make_grad_scaler

    unet, te = _tiny_net(), torch.nn.Linear(4, 4).cuda()
    opt_file = parse_optimizer_json(json.dumps({"base": {"optimizer": "adamw", "lr": 1e-3}}), "test")
    settings = TrainOptimSettings(lr=1e-3, disable_textenc_training=True)
    optim = build_optimizers(opt_file, settings, unet=unet, text_encoder=te, total_optimizer_steps=4)
    scaler = make_grad_scaler(torch.float16, torch.device("cuda"))
    before = [p.detach().clone() for p in unet.parameters()]
    scale = scaler.get_scale()
    with torch.autocast("cuda", dtype=torch.float16):
        loss = unet(torch.randn(2, 128, device="cuda")).float().sum()
    scaler.scale(loss).backward()
    next(unet.parameters()).grad[0, 0] = float("inf")
    result = optim.step(scaler)
    assert result.skipped
    assert scaler.get_scale() == pytest.approx(scale * 0.5, rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(before, unet.parameters(), strict=True))


def test_fp16_scale_survives_resume(tmp_path):
    from tests.helpers import ROOT, base_args
    from trainer.config import load_config
    from trainer.run.session import build_session

    _, first = _train(tmp_path, mixed_precision="fp16", project_name="fp16", stop_at_step=2)
    scale = first.scaler.state_dict()
    settings = {**RUN, "data_root": str(tmp_path / "data"), "optimizer_config": _opt_file(tmp_path)}
    args = base_args(
        tmp_path, mixed_precision="fp16", project_name="fp16", resume_ckpt="findlast", **settings
    )
    resumed = build_session(load_config(str(ROOT / "train.json"), args))  # restored, nothing trained yet
    try:
        assert resumed.resumed_from is not None
        assert resumed.scaler.state_dict() == scale
    finally:
        resumed.close()


@pytest.mark.parametrize("attn_type", ["sdp", "slice", "xformers"])
def test_each_attention_choice_trains(tmp_path, attn_type):
    if attn_type == "xformers":
        pytest.importorskip("xformers")
    summary, _ = _train(tmp_path, attn_type=attn_type, project_name=attn_type, mixed_precision="bf16")
    assert summary.status == "finished" and summary.nonfinite_steps == 0


def test_compile_trains_with_inductor(tmp_path):
    summary, session = _train(
        tmp_path, compile=True, compile_backend="inductor", mixed_precision="bf16", project_name="compiled"
    )
    assert summary.status == "finished" and summary.nonfinite_steps == 0
    assert not any(k.startswith("_orig_mod") for k in session.model.unet.state_dict())


def test_save_and_resume_equals_the_straight_run(tmp_path):
    """Bitwise with the `deterministic` key where it exists; otherwise within 2e-3 (the stated
    tolerance: cuDNN/cuBLAS pick non-deterministic kernels, and atomics reorder sums)."""
    from trainer.config import TrainConfig

    exact = "deterministic" in TrainConfig.model_fields
    extra = {"deterministic": True} if exact else {}
    common = dict(RUN, max_epochs=2, mixed_precision="bf16", **extra)
    data = copy_images(tmp_path / "data", 8)
    opt = _opt_file(tmp_path)
    _, straight = train_in_process(
        tmp_path, project_name="straight", data_root=data, optimizer_config=opt, **common
    )
    train_in_process(
        tmp_path, project_name="resumed", data_root=data, optimizer_config=opt, stop_at_step=3, **common
    )
    _, resumed = train_in_process(
        tmp_path,
        project_name="resumed",
        data_root=data,
        optimizer_config=opt,
        resume_ckpt="findlast",
        **common,
    )
    a = pipeline_weights(checkpoint_dirs(straight.run.path)[-1])
    b = pipeline_weights(checkpoint_dirs(resumed.run.path)[-1])
    if exact:
        assert_bitwise_equal(a, b)
    else:
        worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
        assert worst < 2e-3, worst


def test_cached_vae_and_text_encoder_wait_on_the_host_and_come_back_for_samples(tmp_path, caplog):
    """Item 5b on a real device: after the caches are filled the VAE and the frozen text encoder
    hold no device memory; sampling brings them back (its images are written) and parks them
    again; no use outside sampling was seen."""
    import logging

    from tests.helpers import ROOT

    with caplog.at_level(logging.INFO):
        summary, session = _train(
            tmp_path,
            mixed_precision="bf16",
            cache_latents=True,
            cache_text_encoder_outputs=True,
            disable_textenc_training=True,
            sample_prompts=str(ROOT / "data" / "sample_prompts.json"),
            sample_steps=2,
            project_name="parked",
        )
    assert summary.status == "finished" and summary.nonfinite_steps == 0
    model = session.model
    assert {p.device.type for p in model.vae.parameters()} == {"cpu"}
    assert {p.device.type for p in model.text_encoder.parameters()} == {"cpu"}
    assert model.unet.device.type == "cuda"
    assert "used while parked" not in caplog.text and "sample image" in caplog.text
