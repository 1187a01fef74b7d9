"""Several machines, proven on one: docs/DISTRIBUTED.md's two-machine `accelerate launch`, run
as machine rank 0 and 1 on this machine (main process on the loopback address, one CPU process
per "machine", gloo), checked as the one-machine test checks torchrun (issue 32).

Slow (three two-process launches and a single-process run of the tiny model): `-m slow`.
"""

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
from tests.test_distributed import RUN, WORKER, optimizer_file

pytestmark = pytest.mark.slow


def two_machines(out, args, port_offset: int = 0) -> list[dict]:
    """`accelerate launch --num_machines 2` twice, as machine rank 0 and 1, at the same time."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    port = str(29600 + (os.getpid() + port_offset) % 300)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2"]
    launch += ["--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", port]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1"]
    machines = [
        subprocess.Popen(
            [*launch, "--machine_rank", str(rank), str(WORKER), str(out), *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    logs = [m.communicate(timeout=900)[0] for m in machines]
    for machine, log in zip(machines, logs, strict=True):
        assert machine.returncode == 0, log[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_two_machine_launch_matches_one_process_and_resumes_exactly(tmp_path):
    data = copy_images(tmp_path / "data", 12)  # at batch 3 on 2 ranks: 2 global steps per epoch
    sgd = optimizer_file(tmp_path, "sgd", 0.02)
    run = dict(RUN, data_root=data, optimizer_config=sgd)
    ranks = two_machines(tmp_path / "a", base_args(tmp_path, project_name="two", grad_accum=1, **run))
    assert ranks[0]["unet"] == ranks[1]["unet"] and ranks[0]["text_encoder"] == ranks[1]["text_encoder"]
    assert ranks[0]["global_step"] == 6
    logs = tmp_path / "logs"
    runs = [p for p in logs.iterdir() if p.name.startswith("two-")]
    assert len(runs) == 1 and len(checkpoint_dirs(runs[0])) == 1  # one run folder, one save

    single = run_train(base_args(tmp_path, project_name="single", grad_accum=2, **run))
    assert single.returncode == 0, single.stderr[-3000:]
    one = pipeline_weights(
        checkpoint_dirs(next(p for p in logs.iterdir() if p.name.startswith("single-")))[-1]
    )
    two = pipeline_weights(checkpoint_dirs(runs[0])[-1])
    start = start_weights()
    moved = max((one[k] - start[k]).abs().max().item() for k in one)
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert moved > 1e-3 and worst <= 1e-4 * moved, (worst, moved)

    adamw = dict(run, optimizer_config=optimizer_file(tmp_path))
    first = two_machines(
        tmp_path / "b", base_args(tmp_path, project_name="resumed", stop_at_step=3, grad_accum=1, **adamw), 1
    )
    assert first[0]["status"] == "stop_at_step" and first[0]["global_step"] == 3
    second = two_machines(
        tmp_path / "c",
        base_args(tmp_path, project_name="resumed", resume_ckpt="findlast", grad_accum=1, **adamw),
        2,
    )
    straight = two_machines(
        tmp_path / "d", base_args(tmp_path, project_name="straight", grad_accum=1, **adamw), 3
    )
    assert second[0]["global_step"] == 6 and second[0]["run"] == first[0]["run"]
    assert second[0]["unet"] == second[1]["unet"] == straight[0]["unet"]
    assert_bitwise_equal(
        pipeline_weights(checkpoint_dirs(logs / os.path.basename(straight[0]["run"]))[-1]),
        pipeline_weights(checkpoint_dirs(logs / os.path.basename(second[0]["run"]))[-1]),
    )
