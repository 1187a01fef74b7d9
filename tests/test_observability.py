"""What a user watches: TensorBoard tags, sample images, validation curves, continuity across resume."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import (
    ROOT,
    adamw_file,
    assert_bitwise_equal,
    checkpoint_dirs,
    pipeline_weights,
    train_in_process,
)

SAMPLES = {
    "num_inference_steps": 3,
    "generate_pretrain_samples": True,
    "cfgs": [2.0],
    "samples": [
        {"prompt": "a red circle on a blue background", "size": [64, 64]},
        {"prompt": "a green square", "seed": 7, "size": [128, 64]},
    ],
}


def events(run_folder) -> EventAccumulator:
    acc = EventAccumulator(str(run_folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def sample_file(tmp_path) -> str:
    path = tmp_path / "sample_prompts.json"
    path.write_text(json.dumps(SAMPLES))
    return str(path)


@pytest.fixture(scope="module")
def watched_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("watched")
    summary, session = train_in_process(
        tmp_path,
        max_epochs=2,
        log_step=2,
        sample_prompts=sample_file(tmp_path),
        sample_steps=6,
        validation_config=str(ROOT / "validation_default.json"),
        optimizer_config=str(ROOT / "optimizer_dadapt.json"),
        lr=None,
        resolution=64,
    )
    return summary, session


def test_every_documented_tag_is_written_with_sensible_values(watched_run):
    summary, session = watched_run
    acc = events(session.run.path)
    tags = set(acc.Tags()["scalars"])
    expected = {
        "loss/train",
        "loss/train_epoch",
        "loss/val",
        "loss/train_stabilized",
        "lr/unet",
        "lr/text_encoder",
        "lr_effective/unet",
        "lr_effective/text_encoder",
        "grad_norm/unet",
        "grad_norm/text_encoder",
        "performance/images_per_second",
        "performance/seconds_per_step",
        "progress/epoch",
    }
    assert expected <= tags, expected - tags
    assert any(t.startswith("loss_by_timestep/") for t in tags)
    for tag in tags:
        assert all(math.isfinite(e.value) for e in acc.Scalars(tag)), tag
    assert all(e.value > 0 for e in acc.Scalars("loss/train"))
    # D-Adaptation: the nominal LR is 1.0, the effective LR is d*lr (d starts at d0 = 1e-6).
    assert acc.Scalars("lr/unet")[-1].value == pytest.approx(1.0)
    d = session.optim.components["unet"].optimizer.param_groups[0]["d"]
    assert d > 1e-6 and acc.Scalars("lr_effective/unet")[-1].value == pytest.approx(d * 1.0, rel=1e-6)
    steps = [e.step for e in acc.Scalars("loss/train")]
    epoch_ends = {13, 26}  # the last window of an epoch is flushed even between log_step points
    assert steps == sorted(set(range(2, summary.global_step + 1, 2)) | epoch_ends)
    assert [e.step for e in acc.Scalars("loss/val")][0] == 0  # baseline before training
    assert len(acc.Scalars("loss/train_epoch")) == 2


def test_sample_images_have_the_right_count_and_size(watched_run):
    summary, session = watched_run
    points = 1 + summary.global_step // 6  # baseline + every sample_steps
    pngs = sorted(session.run.samples.glob("*.png"))
    assert len(pngs) == points * len(SAMPLES["samples"])
    sizes = {Image.open(p).size for p in pngs}
    assert sizes == {(64, 64), (128, 64)}
    for png in pngs:  # a picture, not one flat colour (what NaN weights or a dead decoder give)
        pixels = np.asarray(Image.open(png).convert("RGB"), dtype=np.float32)
        assert pixels.std() > 1.0, png.name
    images = events(session.run.path).Tags()["images"]
    # each image's tag carries its prompt, reduced to what a tag may hold
    assert set(images) == {
        "samples_live/00-a_red_circle_on_a_blue_background",
        "samples_live/01-a_green_square",
    }


def fast(tmp_path) -> dict:
    """64 px and plain AdamW: neither resolution nor optimizer is the subject of these tests."""
    return {"resolution": 64, "optimizer_config": adamw_file(tmp_path)}


def test_validation_curve_is_identical_between_runs_with_same_seed(tmp_path):
    val_cfg = tmp_path / "val.json"
    val_cfg.write_text(json.dumps({"auto_split_proportion": 0.15, "every_n_epochs": 0.25}))
    runs = []
    for name in ("a", "b"):
        _, session = train_in_process(
            tmp_path, project_name=name, stop_at_step=8, validation_config=str(val_cfg), **fast(tmp_path)
        )
        runs.append([(e.step, e.value) for e in events(session.run.path).Scalars("loss/val")])
    assert runs[0] == runs[1]
    assert [step for step, _ in runs[0]] == [0, 4, 7]  # baseline, then 4 points per epoch (13 steps)
    assert runs[0][-1][1] < runs[0][0][1]


def test_resumed_run_continues_the_curves(tmp_path):
    run = dict(project_name="cont", log_step=1, batch_size=6, **fast(tmp_path))
    first, session = train_in_process(tmp_path, stop_at_step=4, **run)
    second, resumed = train_in_process(tmp_path, resume_ckpt="findlast", **run)
    assert resumed.run.path == session.run.path
    steps = [e.step for e in events(session.run.path).Scalars("loss/train")]
    assert steps == list(range(1, second.global_step + 1))


def test_sampling_and_validation_do_not_change_the_trajectory(tmp_path):
    _, quiet = train_in_process(tmp_path, project_name="quiet", stop_at_step=4, **fast(tmp_path))
    _, watched = train_in_process(
        tmp_path,
        project_name="watched",
        stop_at_step=4,
        **fast(tmp_path),
        sample_prompts=sample_file(tmp_path),
        sample_steps=2,
        validation_config=manual_validation(tmp_path),
    )
    assert_bitwise_equal(
        pipeline_weights(checkpoint_dirs(quiet.run.path)[-1]),
        pipeline_weights(checkpoint_dirs(watched.run.path)[-1]),
    )
    assert list(watched.run.samples.glob("*.png"))
    assert len(events(watched.run.path).Scalars("loss/val")) >= 1


def manual_validation(tmp_path) -> str:
    """A manual validation set (copies of some training images), so the training set is unchanged."""
    folder = tmp_path / "val_images"
    folder.mkdir()
    for image in sorted((ROOT / "data" / "shapes").glob("*.png"))[:6]:
        shutil.copy(image, folder / image.name)
        shutil.copy(image.with_suffix(".txt"), folder / image.with_suffix(".txt").name)
    path = tmp_path / "val.json"
    path.write_text(json.dumps({"val_split_mode": "manual", "manual_data_root": str(folder)}))
    return str(path)
