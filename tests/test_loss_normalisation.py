"""Every sample of an optimizer step weighs the same: the loss is summed over the window and
divided by the window's sample count, so grad_accum k x batch b and one batch of k*b take the
same step. Plain SGD (no momentum, no weight decay) makes the update lr x gradient, so a wrong
scale shows up in the weights; AdamW would hide it (it is blind to a constant gradient scale).
"""

from __future__ import annotations

import json

import torch

from tests.helpers import copy_images, start_weights, train_in_process
from trainer.data.items import CaptionSpec, ImageItem
from trainer.data.planner import plan_epoch

SGD_LR = 1.0


def sgd_file(path) -> str:
    path.write_text(json.dumps({"base": {"optimizer": "sgd", "lr": SGD_LR}, "text_encoder_overrides": None}))
    return str(path)


def positions(seed: int, batch_size: int, grad_accum: int, n: int) -> dict[int, int]:
    """item -> its position in epoch 0 (the position seeds the sample's noise and timestep)."""
    items = [ImageItem(f"/d/{k}.png", 64, 64, CaptionSpec(f"c{k}")) for k in range(n)]
    plan = plan_epoch(items, [(64, 64)] * n, epoch=0, seed=seed, batch_size=batch_size, grad_accum=grad_accum)
    return {ref.item_index: ref.position for batch in plan.batches for ref in batch}


def trained_delta(session) -> dict[str, torch.Tensor]:
    start = start_weights()
    return {
        f"{comp}/{k}": v.detach().float() - start[f"{comp}/{k}"]
        for comp in ("unet", "text_encoder")
        for k, v in getattr(session.model, comp).state_dict().items()
    }


def test_grad_accum_k_by_b_takes_the_step_of_one_batch_of_k_times_b(tmp_path):
    n = 4
    # A seed whose plans give every image the same position (hence the same noise) both ways.
    seed = next(s for s in range(100) if positions(s, n, 1, n) == positions(s, 2, 2, n))
    data = copy_images(tmp_path / "data", n)
    common = dict(
        data_root=data,
        optimizer_config=sgd_file(tmp_path / "sgd.json"),
        lr=SGD_LR,
        seed=seed,
        resolution=64,
        max_epochs=1,
        no_save_ckpt=True,
        save_optimizer=False,
    )
    one, s_one = train_in_process(tmp_path, project_name="one", batch_size=n, grad_accum=1, **common)
    acc, s_acc = train_in_process(tmp_path, project_name="acc", batch_size=2, grad_accum=2, **common)
    assert one.global_step == acc.global_step == 1
    a, b = trained_delta(s_one), trained_delta(s_acc)
    scale = max(v.abs().max().item() for v in a.values())
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert scale > 1e-4
    assert worst <= 1e-4 * scale
