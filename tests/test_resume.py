"""Exact resume: N steps straight == k steps + resume + N-k steps, bitwise, on CPU."""

from __future__ import annotations

import json
import math

import pytest

from tests.helpers import assert_bitwise_equal, checkpoint_dirs, scalars, train_in_process
from trainer.runtime.errors import CheckpointError

# Warmup 2 then cosine to 0 at step 10: the resume at step 3 lands in the decay.
COSINE = {"lr_scheduler": "cosine", "lr_warmup_steps": 2, "lr_decay_steps": 10}
OPTIMIZERS = {
    "adamw": {"optimizer": "adamw", "lr": 2e-4, **COSINE},
    "adamw8bit": {"optimizer": "adamw8bit", "lr": 2e-4},
    "dadapt_adam": {"optimizer": "dadapt_adam", "lr": 1.0, "decouple": True, **COSINE},
}

# grad_accum 2 and batch 3 on 60 images: 20 batches = 10 optimizer steps per epoch; stopping
# at step 3 resumes in the middle of epoch 0, at batch 6.
RUN = dict(
    resolution=64,
    max_epochs=1,
    batch_size=3,
    grad_accum=2,
    lr=None,
    ema_decay_rate=0.9,
    ema_update_interval=1,
    cond_dropout=0.2,
    shuffle_tags=True,
    flip_p=0.5,
)


def optimizer_file(tmp_path, spec: dict) -> str:
    path = tmp_path / "optimizer.json"
    path.write_text(json.dumps({"base": spec, "text_encoder_overrides": None}))
    return str(path)


def final_checkpoint(session):
    return checkpoint_dirs(session.run.path)[-1]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_resume_is_bitwise_exact(tmp_path, name):
    opt = optimizer_file(tmp_path, OPTIMIZERS[name])
    straight, s_session = train_in_process(tmp_path, project_name="straight", optimizer_config=opt, **RUN)
    assert straight.status == "finished" and straight.global_step == 10

    first, _ = train_in_process(tmp_path, project_name="resumed", optimizer_config=opt, stop_at_step=3, **RUN)
    assert first.status == "stop_at_step" and first.global_step == 3
    second, r_session = train_in_process(
        tmp_path, project_name="resumed", optimizer_config=opt, resume_ckpt="findlast", **RUN
    )
    assert second.status == "finished" and second.global_step == 10
    assert r_session.resumed_from is not None and r_session.run.path == first.checkpoints[0].parent.parent

    a, b = final_checkpoint(s_session), final_checkpoint(r_session)
    assert_bitwise_equal(_weights(a, "pipeline"), _weights(b, "pipeline"))
    assert_bitwise_equal(_weights(a, "pipeline_ema"), _weights(b, "pipeline_ema"))

    # The LR logged after each step, before and after the resume, is the schedule's value there.
    spec = OPTIMIZERS[name]
    expected = [(step, spec["lr"] * _schedule(spec, step)) for step in range(1, 11)]
    for tag in ("lr/unet", "lr/text_encoder"):
        resumed = scalars(r_session.run.path, tag)
        assert resumed == scalars(s_session.run.path, tag)
        assert [s for s, _ in resumed] == [s for s, _ in expected]
        assert [v for _, v in resumed] == pytest.approx([v for _, v in expected], rel=1e-6, abs=1e-12)
    if spec["optimizer"].startswith("dadapt"):  # d x lr: D-Adaptation's estimate continues too
        effective = scalars(r_session.run.path, "lr_effective/unet")
        assert effective == scalars(s_session.run.path, "lr_effective/unet")
        assert len(effective) == 10 and len({v for _, v in effective}) > 2


def _schedule(spec: dict, step: int) -> float:
    """diffusers' cosine with linear warmup (half a cycle), or constant."""
    if spec.get("lr_scheduler") != "cosine":
        return 1.0
    warmup, total = spec["lr_warmup_steps"], spec["lr_decay_steps"]
    if step < warmup:
        return step / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def _weights(checkpoint, folder):
    from safetensors.torch import load_file

    out = {}
    for comp, fname in (
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ):
        out.update({f"{comp}/{k}": v for k, v in load_file(str(checkpoint / folder / comp / fname)).items()})
    return out


def test_resume_of_a_named_checkpoint_refuses_changed_batch_size(tmp_path):
    """Naming a checkpoint asks for an exact resume; findlast would continue from its weights
    instead (EveryDream2 chaining, tests/test_chaining.py)."""
    opt = optimizer_file(tmp_path, OPTIMIZERS["adamw"])
    first, _ = train_in_process(tmp_path, project_name="p", optimizer_config=opt, stop_at_step=1, **RUN)
    changed = {**RUN, "batch_size": 2}
    with pytest.raises(CheckpointError, match=r"batch_size: checkpoint 3 -> now 2"):
        train_in_process(
            tmp_path, project_name="p", optimizer_config=opt, resume_ckpt=str(first.checkpoints[0]), **changed
        )


def test_findlast_without_checkpoint_names_project(tmp_path):
    with pytest.raises(CheckpointError, match="no complete checkpoint of project 'ghost' nor of any other"):
        train_in_process(tmp_path, project_name="ghost", resume_ckpt="findlast")


SPEED_RUN = dict(
    max_epochs=1,
    batch_size=4,
    resolution=64,
    lr=None,
    cond_dropout=0.2,
    flip_p=0.5,
    no_save_ckpt=True,
)


@pytest.mark.parametrize(
    "options",
    [
        {"fused_back_pass": True},
        {"weight_dtype": "bf16", "ema_decay_rate": 0.9, "ema_update_interval": 1},
        {"weight_dtype": "bf16", "fused_back_pass": True},
        {"cache_text_encoder_outputs": True, "disable_textenc_training": True},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items() if not k.startswith("ema")),
)
def test_resume_is_bitwise_exact_with_speed_options(tmp_path, options):
    """Per-parameter optimizer state, the stochastic-rounding stream and a cache that starts
    empty after the restart must all continue exactly."""
    opt = optimizer_file(tmp_path, OPTIMIZERS["adamw"])
    run = {**SPEED_RUN, **options, "optimizer_config": opt}
    _, straight = train_in_process(tmp_path, project_name="straight", stop_at_step=4, **run)
    train_in_process(tmp_path, project_name="resumed", stop_at_step=2, **run)
    summary, resumed = train_in_process(
        tmp_path, project_name="resumed", stop_at_step=4, resume_ckpt="findlast", **run
    )
    assert summary.global_step == 4 and resumed.resumed_from is not None
    assert_bitwise_equal(
        _weights(final_checkpoint(straight), "pipeline"), _weights(final_checkpoint(resumed), "pipeline")
    )


def test_fused_and_plain_optimizer_states_are_not_interchangeable(tmp_path):
    opt = optimizer_file(tmp_path, OPTIMIZERS["adamw"])
    first, _ = train_in_process(tmp_path, project_name="p", optimizer_config=opt, stop_at_step=1, **SPEED_RUN)
    with pytest.raises(CheckpointError, match="fused_back_pass: checkpoint False -> now True"):
        train_in_process(
            tmp_path,
            project_name="p",
            optimizer_config=opt,
            resume_ckpt=str(first.checkpoints[0]),
            fused_back_pass=True,
            **SPEED_RUN,
        )


def test_training_state_holds_no_generator_and_reads_older_checkpoints():
    """Noise comes from per-sample seeds, so the state carries no generator; a state written
    when it still did (a "generator" entry nothing drew from) loads, the entry ignored."""
    import torch

    from trainer.checkpointing.state import TrainingState

    state = TrainingState(global_step=7, epoch=1, batch_in_epoch=3, samples_seen=40)
    saved = state.state_dict()
    assert "generator" not in saved
    older = {**saved, "generator": torch.Generator().manual_seed(5).get_state()}
    restored = TrainingState()
    restored.load_state_dict(older)
    assert restored.state_dict() == saved
