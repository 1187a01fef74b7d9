"""Run-level proofs that each training option reaches the step and does what it says.

Every test trains in-process on the bundled data with a tiny model for a couple of optimizer
steps. The option tests compare against one baseline run (same seed): a change in the trained
weights proves the option is wired through, while gradient checkpointing (same maths) must
reproduce the baseline, which also proves the comparison itself is deterministic.
"""

from __future__ import annotations

import json
import logging
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import (
    DATA,
    ROOT,
    base_args,
    checkpoint_dirs,
    copy_images,
    pipeline_weights,
    scalars,
    start_weights,
    train_in_process,
)
from trainer.optim.fused_backward import FusedOptimizerSet
from trainer.optim.optimizer_set import OptimizerSet
from trainer.runtime.errors import TrainingStopped
from trainer.step import diffusion
from trainer.step.training_step import StepOutput, TrainingStep

# Max |difference| that counts as "the same run": gradient checkpointing recomputes the same
# float32 maths; a changed option moves Adam's first updates by ~lr = 3e-4 somewhere.
SAME_TOL = 1e-6


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """Tiny models gain nothing from intra-op threads, and with other test processes on the
    machine OpenMP oversubscription makes a step ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fast(tmp_path_factory):
    """Overrides for a quick run: 64 px, plain AdamW (8-bit AdamW is slow on CPU), no exports.

    One logdir for the module, so the latent cache is filled once and shared by all runs.
    """
    root = tmp_path_factory.mktemp("options")
    opt = root / "optimizer_adamw.json"
    opt.write_text(
        json.dumps(
            {
                "base": {"optimizer": "adamw", "lr": 1e-4, "lr_scheduler": "constant", "foreach": True},
                "text_encoder_overrides": {"lr": 1e-4},
            }
        )
    )
    return {
        "logdir": str(root / "logs"),
        "optimizer_config": str(opt),
        "resolution": 64,
        "batch_size": 4,
        "max_epochs": 1,
        "stop_at_step": 2,
        "no_save_ckpt": True,
        "save_optimizer": False,
        "log_step": 1,
    }


def run(tmp_path, fast, **overrides):
    return train_in_process(tmp_path, **{**fast, **overrides})


def weights(session) -> dict[str, torch.Tensor]:
    out = {}
    for comp in ("unet", "text_encoder"):
        for key, tensor in getattr(session.model, comp).state_dict().items():
            out[f"{comp}/{key}"] = tensor.detach().float().clone()
    return out


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def all_finite(w: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in w.values())


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, fast):
    summary, session = run(tmp_path_factory.mktemp("baseline"), fast)
    assert summary.status == "stop_at_step" and summary.global_step == 2
    return {
        "weights": weights(session),
        "loss": scalars(session.run.path, "loss/train"),
        "grad_norm": scalars(session.run.path, "grad_norm/unet"),
        "final_loss": summary.final_loss,
    }


@pytest.mark.parametrize(
    "option",
    [
        {"min_snr_gamma": 5.0},
        {"zero_frequency_noise_ratio": 0.3},
        {"pyramid_noise_discount": 0.5},
        {"enable_zero_terminal_snr": True},
        {"loss_type": "huber"},
        {"clip_skip": 2},
        {"embedding_perturbation": 0.5},
    ],
    ids=lambda o: ",".join(o),
)
def test_option_changes_the_trained_weights_and_stays_finite(tmp_path, fast, baseline, option):
    summary, session = run(tmp_path, fast, **option)
    assert summary.global_step == 2
    assert math.isfinite(summary.final_loss)
    trained = weights(session)
    assert all_finite(trained)
    assert max_diff(trained, baseline["weights"]) > 100 * SAME_TOL, f"{option} had no effect on training"


def test_timesteps_are_drawn_only_from_timestep_start_to_end(tmp_path, fast, monkeypatch):
    drawn: list[int] = []
    real_call = TrainingStep.__call__

    def call(self, batch):
        out = real_call(self, batch)
        drawn.extend(out.timesteps.tolist())
        return out

    monkeypatch.setattr(TrainingStep, "__call__", call)
    summary, _ = run(tmp_path, fast, timestep_start=500, timestep_end=502)  # end is exclusive
    assert summary.global_step == 2 and math.isfinite(summary.final_loss)
    assert len(drawn) == 2 * fast["batch_size"] and set(drawn) <= {500, 501}


def test_max_token_length_changes_nothing_for_short_captions(tmp_path, fast, baseline):
    """Short captions encode bitwise like 77 tokens, so the run equals the baseline exactly;
    this also proves two runs with the same seed are identical, which the tests above rely on."""
    summary, session = run(tmp_path, fast, max_token_length=150)
    assert max_diff(weights(session), baseline["weights"]) == 0.0


def test_max_token_length_150_trains_on_the_tokens_past_75(tmp_path, fast):
    data = tmp_path / "long"
    data.mkdir()
    filler = ", ".join(f"tone {i}" for i in range(40))  # ~120 tokens; distinct tags (repeats are merged)
    for png in sorted(DATA.glob("*.png"))[:8]:
        shutil.copy(png, data / png.name)
        caption = png.with_suffix(".txt").read_text().strip()
        (data / png.name).with_suffix(".txt").write_text(f"{caption}, {filler}")
    _, short = run(tmp_path / "75", fast, data_root=str(data), max_token_length=75)
    _, long = run(tmp_path / "150", fast, data_root=str(data), max_token_length=150)
    assert max_diff(weights(long), weights(short)) > 100 * SAME_TOL


def test_gradient_checkpointing_gives_the_same_loss_and_trains(tmp_path, fast, baseline):
    summary, session = run(tmp_path, fast, gradient_checkpointing=True)
    assert session.model.unet.is_gradient_checkpointing
    loss = scalars(session.run.path, "loss/train")
    assert [s for s, _ in loss] == [1, 2]
    assert abs(loss[0][1] - baseline["loss"][0][1]) <= 1e-5, (loss, baseline["loss"])
    trained = weights(session)
    assert max_diff(trained, start_weights()) > 100 * SAME_TOL  # it trains
    assert max_diff(trained, baseline["weights"]) <= SAME_TOL  # and the same way


def test_bf16_on_cpu_trains_and_stays_finite(tmp_path, fast, baseline):
    summary, session = run(tmp_path, fast, mixed_precision="bf16")
    assert session.step.autocast_dtype is torch.bfloat16 and session.scaler is None
    assert math.isfinite(summary.final_loss)
    trained = weights(session)
    assert all_finite(trained)
    assert trained["unet/conv_in.weight"].dtype == torch.float32  # master weights stay fp32
    assert max_diff(trained, start_weights()) > 100 * SAME_TOL


def test_v_prediction_model_trains_on_v_targets(tmp_path, fast, monkeypatch):
    recorded = []
    real_target = diffusion.prediction_target

    def spy(schedule, latents, noise, timesteps):
        out = real_target(schedule, latents, noise, timesteps)
        recorded.append((schedule.alphas_cumprod, latents, noise, timesteps, out))
        return out

    monkeypatch.setattr(diffusion, "prediction_target", spy)
    summary, session = run(tmp_path / "v", fast, resume_ckpt="builtin:tiny-sd2")
    assert session.step.schedule.prediction_type == "v_prediction"
    assert math.isfinite(summary.final_loss) and all_finite(weights(session))
    assert len(recorded) == 2
    for alphas_cumprod, x0, eps, t, target in recorded:
        ab = alphas_cumprod[t].reshape(-1, 1, 1, 1)
        torch.testing.assert_close(target, ab.sqrt() * eps - (1 - ab).sqrt() * x0)
        assert not torch.allclose(target, eps)

    v_weights = weights(session)
    summary_eps, session_eps = run(
        tmp_path / "eps", fast, resume_ckpt="builtin:tiny-sd2", prediction_type="epsilon"
    )
    assert session_eps.step.schedule.prediction_type == "epsilon"
    assert math.isfinite(summary_eps.final_loss)
    assert max_diff(weights(session_eps), v_weights) > 100 * SAME_TOL


def test_ema_follows_the_decay_law(tmp_path, fast, monkeypatch):
    """EMA after n updates == d^n * initial + sum_k (1-d) d^(n-k) * live weights after step k."""
    decay, n = 0.7, 3
    history: list[list[torch.Tensor]] = []  # unet params: before step 1, then after each step
    real_step = OptimizerSet.step

    def recording_step(self, scaler=None):
        params = self.components["unet"].params
        if not history:
            history.append([p.detach().clone() for p in params])
        result = real_step(self, scaler)
        history.append([p.detach().clone() for p in params])
        return result

    monkeypatch.setattr(OptimizerSet, "step", recording_step)
    summary, session = run(tmp_path, fast, stop_at_step=n, ema_decay_rate=decay, ema_update_interval=1)
    assert summary.global_step == n and len(history) == n + 1
    ema = session.ema
    assert ema.num_updates == n

    names = {id(p): name for name, p in session.model.unet.named_parameters()}
    params = session.optim.components["unet"].params
    ema_vs_live = 0.0
    for i, p in enumerate(params):
        expected = decay**n * history[0][i]
        for k in range(1, n + 1):
            expected = expected + (1 - decay) * decay ** (n - k) * history[k][i]
        shadow = ema.shadow["unet"][names[id(p)]]
        torch.testing.assert_close(shadow, expected, atol=1e-6, rtol=1e-5)
        ema_vs_live = max(ema_vs_live, float((shadow - p.detach()).abs().max()))
    assert ema_vs_live > 100 * SAME_TOL  # the EMA is not the live model

    # The checkpoint's EMA pipeline holds the EMA weights, its main pipeline the live ones.
    (ckpt,) = checkpoint_dirs(session.run.path)
    saved_ema = load_file(str(ckpt / "pipeline_ema" / "unet" / "diffusion_pytorch_model.safetensors"))
    saved_live = pipeline_weights(ckpt)
    for name, shadow in ema.shadow["unet"].items():
        assert torch.equal(saved_ema[name], shadow)
        assert torch.equal(saved_live[f"unet/{name}"], dict(session.model.unet.named_parameters())[name])


def _poison(monkeypatch, bad_calls) -> list[list[str]]:
    """Make TrainingStep return a NaN loss (graph attached) on the given 1-based calls."""
    poisoned_paths: list[list[str]] = []
    real_call = TrainingStep.__call__
    calls = {"n": 0}

    def call(self, batch):
        out = real_call(self, batch)
        calls["n"] += 1
        if bad_calls is all or calls["n"] in bad_calls:
            poisoned_paths.append(list(batch.paths))
            return StepOutput(loss=out.loss * float("nan"), timesteps=out.timesteps)
        return out

    monkeypatch.setattr(TrainingStep, "__call__", call)
    return poisoned_paths


def test_nan_batch_is_skipped_reported_and_the_run_continues(tmp_path, fast, monkeypatch, caplog):
    # grad_accum 2: micro-batches 1+2 form optimizer step 1, 3+4 step 2, 5+6 step 3.
    poisoned = _poison(monkeypatch, {2})
    with caplog.at_level(logging.WARNING):
        summary, session = run(tmp_path, fast, grad_accum=2, stop_at_step=3)
    assert summary.global_step == 3 and summary.nonfinite_steps == 1
    assert session.state.nonfinite_in_row == 0
    # Only the two finite windows reached the optimizer.
    opt = session.optim.components["unet"].optimizer
    assert {int(s["step"]) for s in opt.state.values()} == {2}
    assert all_finite(weights(session))
    assert math.isfinite(summary.final_loss)

    skipped = [r.getMessage() for r in caplog.records if "update skipped" in r.getMessage()]
    assert len(skipped) == 1 and skipped[0].startswith("step 1:")
    assert len(poisoned) == 1 and poisoned[0]
    for path in poisoned[0]:  # the poisoned micro-batch ...
        assert path in skipped[0]
    assert skipped[0].count(".png") == 2 * fast["batch_size"]  # ... and the rest of its window
    assert scalars(session.run.path, "problems/nonfinite_steps") == [(1, 1.0)]


def test_repeated_nan_stops_after_saving_the_starting_weights(tmp_path, fast, monkeypatch):
    from trainer.config import load_config
    from trainer.run.loop import train
    from trainer.run.session import build_session

    _poison(monkeypatch, all)
    cfg = load_config(
        str(ROOT / "train.json"), base_args(tmp_path, **{**fast, "stop_at_step": 5, "max_nonfinite_steps": 2})
    )
    session = build_session(cfg)
    with pytest.raises(TrainingStopped) as err:
        train(session)
    (ckpt,) = checkpoint_dirs(session.run.path)
    assert str(ckpt) in str(err.value) and "2 optimizer steps in a row" in str(err.value)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["global_step"] == 2 and manifest["reason"] == "nonfinite"
    saved = pipeline_weights(ckpt)
    start = start_weights()
    assert saved.keys() == start.keys()
    assert all(torch.equal(saved[k], start[k]) for k in saved), "the saved state is not the last good one"


def test_in_process_runs_leave_no_log_handlers_behind(tmp_path, fast, caplog):
    """Each run mirrors the log into its own train.log; a finished run must detach that file,
    or every later run in the process (tests, notebooks) also writes into it."""
    caplog.set_level(logging.INFO)  # "finished at stop_at_step" is an INFO line, as on the console
    root = logging.getLogger()
    before = list(root.handlers)
    _, first = run(tmp_path / "a", fast, stop_at_step=1)
    assert root.handlers == before
    run(tmp_path / "b", fast, stop_at_step=1)
    assert (first.run.path / "train.log").read_text().count("finished at stop_at_step") == 1


# --- speed and memory options (docs/PERFORMANCE.md) -----------------------------------------


def relative_change(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], start: dict[str, torch.Tensor]
) -> float:
    """Mean |a - b| over the mean training update |b - start|: ~0 for two runs of the same maths
    (Adam turns rounding-level gradient differences into a few lr-sized flips), ~1 for unrelated runs."""
    diff = sum(float((a[k] - b[k]).abs().sum()) for k in a)
    moved = sum(float((b[k] - start[k]).abs().sum()) for k in b)
    return diff / moved


def test_fused_back_pass_is_the_same_update_without_keeping_gradients(tmp_path, fast, baseline):
    summary, session = run(tmp_path, fast, fused_back_pass=True)
    assert summary.global_step == 2 and isinstance(session.optim, FusedOptimizerSet)
    # Per-parameter AdamW inside backward is the same update as one AdamW after it: bitwise.
    assert max_diff(weights(session), baseline["weights"]) == 0.0
    assert all(p.grad is None for p in session.model.unet.parameters())  # freed inside backward
    norms = scalars(session.run.path, "grad_norm/unet")
    assert [s for s, _ in norms] == [1, 2]
    for (_, fused), (_, plain) in zip(norms, baseline["grad_norm"], strict=True):
        assert fused == pytest.approx(plain, rel=1e-4)


def test_fused_back_pass_skips_a_nonfinite_loss_before_touching_weights(tmp_path, fast, monkeypatch):
    _poison(monkeypatch, {1})
    summary, session = run(tmp_path, fast, fused_back_pass=True, stop_at_step=3)
    assert summary.global_step == 3 and summary.nonfinite_steps == 1
    # Two finite steps reached the per-parameter optimizers; the poisoned one never did.
    steps = {
        int(o.state[p]["step"])
        for o, p in zip(
            session.optim.fused["unet"].optimizers, session.optim.fused["unet"].params, strict=True
        )
    }
    assert steps == {2}
    assert all_finite(weights(session))


def test_fused_back_pass_refuses_settings_it_cannot_honour(tmp_path, fast):
    from trainer.config import load_config
    from trainer.run.session import build_session
    from trainer.runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="fused_back_pass needs grad_accum 1"):
        load_config(
            str(ROOT / "train.json"),
            base_args(tmp_path, **{**fast, "fused_back_pass": True, "grad_accum": 2}),
        )
    opt = tmp_path / "dadapt.json"
    opt.write_text(json.dumps({"base": {"optimizer": "dadapt_adam", "lr": 1.0}}))
    cfg = load_config(
        str(ROOT / "train.json"),
        base_args(tmp_path, **{**fast, "fused_back_pass": True, "optimizer_config": str(opt)}),
    )
    with pytest.raises(ConfigError, match="optimizer 'dadapt_adam'"):
        build_session(cfg)
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())  # no empty run


def test_text_encoder_cache_trains_like_the_frozen_encoder(tmp_path, fast):
    """8 images, batch 4, 4 steps = 2 epochs: the second epoch is served from the cache."""
    data = copy_images(tmp_path / "data", 8)
    common = {**fast, "data_root": data, "disable_textenc_training": True, "stop_at_step": 4, "max_epochs": 2}
    _, plain = run(tmp_path / "plain", fast, **common)
    _, cached = run(tmp_path / "cached", fast, **common, cache_text_encoder_outputs=True)
    cache = cached.step.text_cache
    assert cache is not None and cache.hits >= 4 and cache.misses <= 10
    loss_plain, loss_cached = scalars(plain.run.path, "loss/train"), scalars(cached.run.path, "loss/train")
    assert [s for s, _ in loss_cached] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(loss_plain, loss_cached, strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    assert relative_change(weights(cached), weights(plain), start_weights()) < 0.05


def test_text_encoder_cache_needs_a_frozen_text_encoder(tmp_path, fast):
    from trainer.config import load_config
    from trainer.runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="cache_text_encoder_outputs needs disable_textenc_training: true"):
        load_config(
            str(ROOT / "train.json"), base_args(tmp_path, **{**fast, "cache_text_encoder_outputs": True})
        )


def test_bf16_weights_train_with_fp32_optimizer_state_ema_and_samples(tmp_path, fast):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(
        json.dumps(
            {
                "num_inference_steps": 2,
                "generate_pretrain_samples": True,
                "samples": [{"prompt": "a red circle"}],
            }
        )
    )
    summary, session = run(
        tmp_path,
        fast,
        weight_dtype="bf16",
        ema_decay_rate=0.9,
        ema_update_interval=1,
        ema_sample_ema_model=True,
        sample_prompts=str(prompts),
        sample_steps=2,
    )
    assert session.model.unet.dtype == torch.bfloat16 and session.model.text_encoder.dtype == torch.bfloat16
    assert session.model.vae.dtype == torch.float32
    trained = weights(session)
    assert all_finite(trained) and math.isfinite(summary.final_loss)
    assert max_diff(trained, start_weights()) > 100 * SAME_TOL
    unet_opt = session.optim.components["unet"].optimizer
    assert {s["exp_avg"].dtype for s in unet_opt.state.values()} == {torch.float32}
    assert all(t.dtype == torch.float32 for t in session.ema.shadow["unet"].values())
    names = sorted(p.name for p in session.run.samples.glob("*.png"))
    assert [n.split("-")[:2] for n in names] == [["gs000000", "ema"], ["gs000002", "ema"]]


def test_compile_with_gradient_checkpointing_trains_like_eager(tmp_path, fast, baseline):
    """aot_eager runs torch.compile's tracing and AOT autograd (the parts that meet checkpointing)
    without inductor's C++ build, which would dominate a CPU test."""
    summary, session = run(
        tmp_path, fast, compile=True, compile_backend="aot_eager", gradient_checkpointing=True
    )
    assert summary.global_step == 2
    assert session.model.unet._compiled_call_impl is not None
    assert not any("_orig_mod" in k for k in session.model.unet.state_dict())  # checkpoints unchanged
    loss = scalars(session.run.path, "loss/train")
    for (_, a), (_, b) in zip(loss, baseline["loss"], strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    assert relative_change(weights(session), baseline["weights"], start_weights()) < 0.05


def test_channels_last_trains_like_the_default_layout(tmp_path, fast, baseline):
    summary, session = run(tmp_path, fast, channels_last=True)
    assert session.model.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    loss = scalars(session.run.path, "loss/train")
    for (_, a), (_, b) in zip(loss, baseline["loss"], strict=True):
        assert a == pytest.approx(b, abs=1e-5)
    assert relative_change(weights(session), baseline["weights"], start_weights()) < 0.05
