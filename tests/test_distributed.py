"""Data-parallel training with torchrun on CPU (gloo): two processes, one run, exact resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import (
    ROOT,
    assert_bitwise_equal,
    base_args,
    checkpoint_dirs,
    copy_images,
    pipeline_weights,
    run_train,
    start_weights,
)

WORKER = ROOT / "tests" / "ddp_worker.py"


@pytest.fixture
def small_data(tmp_path):
    """12 images in one bucket: at batch 3, 4 batches = 2 global windows of 2 batches."""
    return copy_images(tmp_path / "data", 12)


def torchrun(tmp_path, out, args, nproc=2, worker=WORKER):
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(29500 + os.getpid() % 1000),
        str(worker),
        str(out),
        *args,
    ]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


RUN = dict(
    batch_size=3, max_epochs=3, cond_dropout=0.2, flip_p=0.5, shuffle_tags=True, lr=None, resolution=64
)


def optimizer_file(tmp_path, optimizer="adamw", lr=3e-4):
    path = tmp_path / f"{optimizer}.json"
    path.write_text(json.dumps({"base": {"optimizer": optimizer, "lr": lr}, "text_encoder_overrides": None}))
    return str(path)


def test_two_processes_match_one_process_over_the_same_global_batches(tmp_path, small_data):
    """Plain SGD: the update is lr x gradient, so a wrong loss scale across ranks or micro-batches
    (which AdamW would hide) shows in the weights."""
    opt = optimizer_file(tmp_path, "sgd", 0.02)
    ranks = torchrun(
        tmp_path,
        tmp_path / "ddp",
        base_args(
            tmp_path, project_name="ddp", data_root=small_data, optimizer_config=opt, grad_accum=1, **RUN
        ),
    )
    assert ranks[0]["unet"] == ranks[1]["unet"] and ranks[0]["text_encoder"] == ranks[1]["text_encoder"]
    assert ranks[0]["global_step"] == 6
    logdir = tmp_path / "logs"
    runs = [p for p in logdir.iterdir() if p.name.startswith("ddp-")]
    assert len(runs) == 1 and len(checkpoint_dirs(runs[0])) == 1

    # One process, the same global batches: each window of 2 batches becomes one accumulation window.
    single = run_train(
        base_args(
            tmp_path, project_name="single", data_root=small_data, optimizer_config=opt, grad_accum=2, **RUN
        )
    )
    assert single.returncode == 0, single.stderr[-3000:]
    single_run = next(p for p in logdir.iterdir() if p.name.startswith("single-"))
    a = pipeline_weights(checkpoint_dirs(runs[0])[-1])
    b = pipeline_weights(checkpoint_dirs(single_run)[-1])
    start = start_weights()
    moved = max((b[k] - start[k]).abs().max().item() for k in b)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert moved > 1e-3  # the runs trained ...
    assert worst <= 1e-4 * moved, (worst, moved)  # ... and took the same steps


def test_seed_minus_one_gives_every_rank_rank_zeros_random_seed(tmp_path, small_data):
    """Each rank drawing its own seed would shuffle and shard the data differently per rank."""
    run = dict(RUN, max_epochs=1, seed=-1)
    ranks = torchrun(
        tmp_path, tmp_path / "ddp", base_args(tmp_path, project_name="rnd", data_root=small_data, **run)
    )
    seeds = {r["seed"] for r in ranks}
    assert len(seeds) == 1 and seeds != {-1}, seeds
    assert ranks[0]["unet"] == ranks[1]["unet"]


def test_two_process_run_resumes_exactly(tmp_path, small_data):
    opt = optimizer_file(tmp_path)
    common = dict(data_root=small_data, optimizer_config=opt, grad_accum=1, **RUN)
    straight = torchrun(tmp_path, tmp_path / "a", base_args(tmp_path, project_name="straight", **common))
    first = torchrun(
        tmp_path, tmp_path / "b", base_args(tmp_path, project_name="resumed", stop_at_step=3, **common)
    )
    assert first[0]["status"] == "stop_at_step" and first[0]["global_step"] == 3
    second = torchrun(
        tmp_path,
        tmp_path / "c",
        base_args(tmp_path, project_name="resumed", resume_ckpt="findlast", **common),
    )
    assert second[0]["global_step"] == 6 and second[0]["run"] == first[0]["run"]
    assert second[0]["unet"] == second[1]["unet"] == straight[0]["unet"]
    assert second[0]["text_encoder"] == straight[0]["text_encoder"]
    assert_bitwise_equal(
        pipeline_weights(checkpoint_dirs(tmp_path / "logs" / os.path.basename(straight[0]["run"]))[-1]),
        pipeline_weights(checkpoint_dirs(tmp_path / "logs" / os.path.basename(second[0]["run"]))[-1]),
    )


def test_ddp_gradients_are_views_into_its_buckets(tmp_path, small_data):
    """Issue 32 item 2: without `gradient_as_bucket_view` (accelerate leaves it off) DDP keeps
    every gradient twice, in `p.grad` and in its all-reduce bucket: +3.7 GiB per GPU for SD1.5
    with fp32 gradients. Every trained parameter's gradient must lie inside a bucket's buffer."""
    ranks = torchrun(
        tmp_path,
        tmp_path / "bucket",
        base_args(tmp_path, project_name="bucket", data_root=small_data, **RUN),
        worker=ROOT / "tests" / "ddp_bucket_worker.py",
    )
    for rank in ranks:
        for name in ("unet", "text_encoder"):
            got = rank[name]
            assert got["grads"] > 0 and got["in_bucket"] == got["grads"], (rank["rank"], name, got)
            assert got["logged"] == 1, got  # and DDP's own log says so
