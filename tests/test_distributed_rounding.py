"""bf16 weights (stochastic rounding) under DDP: one rounding stream on every rank (issue 13 item 3).

Two gloo processes on CPU: every replica rounds the same all-reduced update with the same bits,
so the bf16 weights stay bitwise identical across ranks, and a stop + resume continues that
stream on every rank (the checkpoint holds rank 0's optimizer state, restored everywhere).
"""

from __future__ import annotations

from pathlib import Path

from tests.helpers import base_args, checkpoint_dirs, copy_images
from tests.test_distributed import optimizer_file, torchrun

RUN = dict(batch_size=3, max_epochs=2, grad_accum=1, lr=None, weight_dtype="bf16", cond_dropout=0.0)


def test_bf16_replicas_stay_identical_and_resume_exactly(tmp_path, builtin_cache):
    from trainer.models import load_model

    load_model("builtin:tiny-sd1")  # built once here, not by two ranks racing on the shared cache
    data = copy_images(tmp_path / "data", 12)  # 2 global steps per epoch at 2 x batch 3
    common = dict(data_root=data, optimizer_config=optimizer_file(tmp_path), **RUN)
    # Two launches: a straight run that also saves after epoch 1 (step 2), and a resume from there.
    straight = torchrun(
        tmp_path, tmp_path / "a", base_args(tmp_path, project_name="p", save_every_n_epochs=1, **common)
    )
    assert straight[0]["global_step"] == 4
    assert straight[0]["unet"] == straight[1]["unet"]
    assert straight[0]["text_encoder"] == straight[1]["text_encoder"]
    mid = next(c for c in checkpoint_dirs(Path(straight[0]["run"])) if c.name.endswith("gs000002"))
    resumed = torchrun(
        tmp_path, tmp_path / "b", base_args(tmp_path, project_name="p", resume_ckpt=str(mid), **common)
    )
    assert resumed[0]["global_step"] == 4
    for key in ("unet", "text_encoder"):
        assert resumed[0][key] == resumed[1][key] == straight[0][key]
