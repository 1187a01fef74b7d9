"""The kohya / OneTrainer options in whole tiny runs: masked loss against the unmasked run, a
fully masked run that cannot move the weights, exact resume with every new option, the text
encoder's stop, and the export precision."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from tests.helpers import (
    assert_bitwise_equal,
    checkpoint_dirs,
    copy_images,
    pipeline_weights,
    start_weights,
    train_in_process,
)
from trainer.data.masks import mask_file_for

SMALL = dict(resolution=64, batch_size=2, max_epochs=2, cond_dropout=0.0, flip_p=0.5)


def _optimizer(tmp_path, weight_decay: float = 0.01) -> str:
    path = tmp_path / "adamw.json"
    spec = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": weight_decay}
    path.write_text(json.dumps({"base": spec, "text_encoder_overrides": None}))
    return str(path)


def _dataset(tmp_path, count: int = 4, mask_value: int | None = None) -> str:
    """`count` bundled images; with `mask_value`, a uniform -masklabel.png beside each."""
    folder = copy_images(tmp_path / "data", count)
    if mask_value is not None:
        for image in sorted((tmp_path / "data").glob("*.png")):
            if not image.stem.endswith("-masklabel"):
                with Image.open(image) as img:
                    Image.new("L", img.size, mask_value).save(mask_file_for(image))
    return folder


def _final(session):
    return checkpoint_dirs(session.run.path)[-1]


def test_all_white_masks_train_bitwise_like_no_masks(tmp_path):
    data, opt = _dataset(tmp_path, mask_value=255), _optimizer(tmp_path)
    _, plain = train_in_process(tmp_path, project_name="plain", data_root=data, optimizer_config=opt, **SMALL)
    summary, masked = train_in_process(
        tmp_path,
        project_name="masked",
        data_root=data,
        optimizer_config=opt,
        masked_loss=True,
        normalize_masked_area_loss=True,
        **SMALL,
    )
    assert summary.global_step == 4 and masked.data.mask_report.with_mask == 4
    assert_bitwise_equal(pipeline_weights(_final(plain)), pipeline_weights(_final(masked)))


def test_all_black_masks_with_zero_unmasked_weight_leave_the_model_unchanged(tmp_path, caplog):
    data = _dataset(tmp_path, mask_value=0)
    caplog.set_level("INFO")
    summary, session = train_in_process(
        tmp_path,
        data_root=data,
        optimizer_config=_optimizer(tmp_path, weight_decay=0.0),
        masked_loss=True,
        unmasked_weight=0.0,
        **SMALL,
    )
    assert summary.global_step == 4 and summary.final_loss == 0.0
    assert "kohya/OneTrainer options: masked_loss (masks from -masklabel.png files, unmasked_weight 0.0)" in (
        caplog.text
    )
    assert "masked_loss: 4 image(s) with a -masklabel.png mask" in caplog.text  # the data summary
    trained = pipeline_weights(_final(session))
    start = start_weights()
    assert_bitwise_equal(
        {k: v for k, v in trained.items() if k.startswith("unet/")},
        {k: v for k, v in start.items() if k.startswith("unet/")},
    )


def _half_masks(folder) -> None:
    """Masks that are white on the left half only (a loss that really depends on them)."""
    for image in sorted(folder.glob("*.png")):
        if image.stem.endswith("-masklabel"):
            continue
        with Image.open(image) as img:
            w, h = img.size
        mask = Image.new("L", (w, h), 0)
        mask.paste(255, (0, 0, w // 2, h))
        mask.save(mask_file_for(image))


def _separated_captions(folder) -> None:
    for caption in sorted(folder.glob("*.txt")):
        words = caption.read_text().strip()
        caption.write_text(f"photo ||| {words}, plain, simple ||| best")


GROUPS = {
    "noise_and_loss": dict(
        ip_noise_gamma=0.1,
        ip_noise_gamma_random_strength=True,
        noise_offset_random_strength=True,
        multires_noise_iterations=3,
        debiased_estimation_loss=True,
        masked_loss=True,  # half masks, read and cut from the image files at every step
    ),
    "captions_masks_in_the_cache_and_saves": dict(
        caption_dropout_every_n_epochs=2,
        keep_tokens_separator="|||",
        shuffle_tags=True,
        masked_loss=True,
        normalize_masked_area_loss=True,
        cache_latents=True,
        save_every_n_steps=1,
        keep_last_checkpoints=9,
        save_precision="bf16",
    ),
    "te_stop_before_the_resume": dict(
        stop_text_encoder_training=2,
        ema_decay_rate=0.9,
        ema_update_interval=1,
        save_every_n_steps=1,
        keep_last_checkpoints=9,
    ),
    "te_stop_after_the_resume": dict(
        stop_text_encoder_training=0.75, ema_decay_rate=0.9, ema_update_interval=1
    ),
}
RESUME_AT = {"te_stop_after_the_resume": 2}


@pytest.mark.parametrize("group", list(GROUPS))
def test_new_options_resume_bitwise_exactly(tmp_path, group):
    data = _dataset(tmp_path)
    _half_masks(tmp_path / "data")
    _separated_captions(tmp_path / "data")
    run = dict(SMALL, data_root=data, optimizer_config=_optimizer(tmp_path), **GROUPS[group])
    straight, s_session = train_in_process(tmp_path, project_name="straight", **run)
    first, _ = train_in_process(tmp_path, project_name="resumed", stop_at_step=RESUME_AT.get(group, 3), **run)
    second, r_session = train_in_process(tmp_path, project_name="resumed", resume_ckpt="findlast", **run)
    assert straight.global_step == second.global_step == 4 and r_session.resumed_from is not None
    a, b = _final(s_session), _final(r_session)
    assert_bitwise_equal(pipeline_weights(a), pipeline_weights(b))
    if "ema_decay_rate" in run:
        assert_bitwise_equal(pipeline_weights(a, "pipeline_ema"), pipeline_weights(b, "pipeline_ema"))
        assert "text_encoder" not in r_session.optim.components  # stopped, its state freed
    if group == "te_stop_before_the_resume":
        _check_text_encoder_stopped_after_step_2(checkpoint_dirs(s_session.run.path))
    if run.get("save_every_n_steps"):  # steps 1, 2, 3; the run's last step is the final save
        saved = checkpoint_dirs(s_session.run.path)
        assert [p.name.split("-")[-1] for p in saved] == ["gs000001", "gs000002", "gs000003", "gs000004"]
        reasons = [json.loads((p / "manifest.json").read_text())["reason"] for p in saved]
        assert reasons == ["steps", "steps", "steps", "final"]
    if run.get("save_precision"):
        with safe_open(str(next(b.glob("*.safetensors"))), "pt") as f:
            dtypes = {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        assert torch.bfloat16 in dtypes and not dtypes & {torch.float16, torch.float32}


def _text_encoder(checkpoint, folder="pipeline"):
    return {k: v for k, v in pipeline_weights(checkpoint, folder).items() if k.startswith("text_encoder/")}


def _check_text_encoder_stopped_after_step_2(saved) -> None:
    """Trained through step 2, then frozen: live and EMA weights no longer move, and the
    checkpoints after the stop hold no text-encoder optimizer state."""
    gs1, gs2, gs3, gs4 = saved
    assert not all(
        torch.equal(a, b)
        for a, b in zip(_text_encoder(gs1).values(), _text_encoder(gs2).values(), strict=True)
    )
    for later in (gs3, gs4):
        assert_bitwise_equal(_text_encoder(gs2), _text_encoder(later))
        assert_bitwise_equal(_text_encoder(gs2, "pipeline_ema"), _text_encoder(later, "pipeline_ema"))
    for ckpt, trains in ((gs1, True), (gs2, False), (gs4, False)):
        state = torch.load(ckpt / "training_state.pt", weights_only=False)
        assert ("text_encoder" in state["optimizers"]["components"]) == trains


@pytest.mark.parametrize(
    ("precision", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)]
)
def test_save_precision_writes_that_dtype(tmp_path, precision, dtype):
    from trainer.checkpointing.contents import export_dtype
    from trainer.config import build_config
    from trainer.models import load_model, save_single_file

    cfg = build_config({"save_precision": precision}, {}, source="test")
    assert export_dtype(cfg) == dtype
    assert export_dtype(build_config({}, {}, source="test")) == torch.float16
    assert export_dtype(build_config({"save_full_precision": True}, {}, source="test")) == torch.float32
    path = tmp_path / "model.safetensors"
    save_single_file(load_model("builtin:tiny-sd1"), path, dtype=export_dtype(cfg))
    with safe_open(str(path), "pt") as f:
        tensors = [f.get_tensor(k) for k in f.keys()]  # noqa: SIM118 (safe_open is no dict)
    assert {t.dtype for t in tensors if t.is_floating_point()} == {dtype}
