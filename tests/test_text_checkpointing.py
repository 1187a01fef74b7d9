"""Gradient checkpointing of the text encoder: the non-reentrant variant, asked for explicitly
(issue 32 item 6).

transformers 4.x checkpoints with `use_reentrant=True` unless told otherwise (5.x changed the
default). The reentrant variant gives no gradient to a checkpointed layer whose input needs
none: with frozen embeddings and front layers (optimizerSD21.json's freezing) the trainable
last layers silently stopped learning. The test emulates 4.x's default on the installed
transformers and checks what reaches `torch.utils.checkpoint.checkpoint`.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers.modeling_utils
from accelerate import Accelerator

from trainer.config import TrainConfig
from trainer.data.batch import Batch
from trainer.optim import parse_optimizer_json
from trainer.parts.builder import build_components

SD21_FREEZING = {"unfreeze_last_n_layers": 2, "freeze_embeddings": True, "freeze_final_layer_norm": False}


@pytest.fixture
def checkpoint_calls(monkeypatch):
    """`use_reentrant` of every checkpoint call, under transformers 4.x's defaults: reentrant
    when no kwargs are given, and no forced `requires_grad` on the embeddings' output."""
    calls = []
    real_checkpoint = torch.utils.checkpoint.checkpoint

    def spy(function, *args, **kwargs):
        calls.append(kwargs.get("use_reentrant", "not given"))
        return real_checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy)  # diffusers looks it up per call
    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", spy)  # transformers binds it at import
    model_class = transformers.modeling_utils.PreTrainedModel
    enable = model_class._activation_checkpointing_enable

    def enable_as_4x(self, kwargs=None, *args, **more):
        enable(self, {"use_reentrant": True} if kwargs is None else kwargs, *args, **more)
        self.disable_input_require_grads()  # 4.x did that only for PEFT models

    monkeypatch.setattr(model_class, "_activation_checkpointing_enable", enable_as_4x)
    return calls


def _one_backward(freezing: dict | None):
    opt = {"base": {"optimizer": "adamw", "lr": 1e-4}}
    if freezing is not None:
        opt["text_encoder_freezing"] = freezing
    cfg = TrainConfig(resume_ckpt="builtin:tiny-sd1", gradient_checkpointing=True, batch_size=2)
    parts = build_components(
        cfg,
        Accelerator(cpu=True),
        opt_file=parse_optimizer_json(json.dumps(opt), "test"),
        total_optimizer_steps=1,
    )
    batch = Batch(["a red circle", "a blue square"], [0, 1], latents=torch.randn(2, 4, 8, 8))
    parts.step(batch).loss.mean().backward()
    return parts.model.text_encoder


@pytest.mark.parametrize("freezing", [None, SD21_FREEZING], ids=["whole encoder", "sd21 freezing"])
def test_text_encoder_checkpoints_without_reentrance_and_its_trainable_layers_learn(
    checkpoint_calls, freezing
):
    text_encoder = _one_backward(freezing)
    assert text_encoder.is_activation_checkpointing
    assert checkpoint_calls and set(checkpoint_calls) == {False}, checkpoint_calls
    trainable = {n: p for n, p in text_encoder.named_parameters() if p.requires_grad}
    if freezing is not None:  # the SD2.1 recipe: embeddings and front layers frozen
        assert not any("embeddings" in n for n in trainable) and any("layers.5." in n for n in trainable)
        assert not any("layers.0." in n for n in trainable)
    no_grad = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"{len(no_grad)} trainable text-encoder tensors got no gradient: {no_grad[:4]}"
