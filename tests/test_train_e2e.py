"""End-to-end: train.py in a subprocess, the run folder it leaves, and that training learns."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.helpers import (
    ROOT,
    base_args,
    checkpoint_dirs,
    pipeline_weights,
    run_folders,
    run_train,
    scalars,
    start_weights,
    train_in_process,
)


def test_train_py_runs_saves_and_checkpoint_generates(tmp_path):
    result = run_train(base_args(tmp_path, max_epochs=1, stop_at_step=4, resolution=64))
    assert result.returncode == 0, result.stderr[-3000:]  # stop_at_step is a normal end (130: signals)
    assert "finished at stop_at_step 4" in result.stderr and "interrupted" not in result.stderr
    (run,) = run_folders(tmp_path / "logs")
    assert (run / "train.log").read_text().strip()
    effective = json.loads((run / "train_effective.json").read_text())
    assert effective["stop_at_step"] == 4 and effective["batch_size"] == 4
    assert json.loads((run / "optimizer_effective.json").read_text())["base"]["optimizer"] == "adamw8bit"
    assert list(run.glob("events.out.tfevents.*"))
    assert [s for s, _ in scalars(run, "loss/train")] == [1, 2, 3, 4]

    (ckpt,) = checkpoint_dirs(run)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["global_step"] == 4
    assert {"training_state.pt", f"{ckpt.name}.safetensors", "pipeline/model_index.json"} <= set(
        manifest["files"]
    )

    start, trained = start_weights(), pipeline_weights(ckpt)
    assert all(torch.isfinite(t).all() for t in trained.values())
    for comp in ("unet", "text_encoder"):
        changed = [k for k in trained if k.startswith(comp) and not torch.equal(trained[k].float(), start[k])]
        assert changed, f"no {comp} weight changed"

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(ckpt / "pipeline"), local_files_only=True)
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    assert np.isfinite(image).all() and image.std() > 1e-3  # a picture, not NaN or one flat colour


def test_loss_falls_clearly_on_the_example_data(tmp_path):
    summary, session = train_in_process(
        tmp_path, max_epochs=4, validation_config=str(ROOT / "validation_default.json"), log_step=5
    )
    assert summary.status == "finished"
    run = session.run.path
    val = scalars(run, "loss/val")
    assert val[0][0] == 0  # baseline before the first step
    assert val[-1][1] < 0.75 * val[0][1], val  # a deterministic, held-out measure of learning
    train = [v for _, v in scalars(run, "loss/train")]
    assert sum(train[-3:]) / 3 < 0.8 * sum(train[:3]) / 3, train


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--batch_sizee", "2"], "did you mean 'batch_size'"),
        (["--resolution", "-5"], "key 'resolution'"),
    ],
)
def test_bad_config_fails_at_once_naming_the_key(tmp_path, args, expected):
    result = run_train([*args, "--logdir", str(tmp_path / "logs")], timeout=60)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "logs").exists()  # nothing created for a run that never started


def test_missing_data_root_is_reported_without_a_run_folder(tmp_path):
    result = run_train(base_args(tmp_path, data_root=str(tmp_path / "nope")), timeout=120)
    assert result.returncode == 2
    assert "nope" in result.stderr and "Traceback" not in result.stderr
    assert not [p for p in (tmp_path / "logs").glob("*") if not p.name.startswith(".")]
