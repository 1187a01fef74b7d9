"""The VAE and a frozen, cached text encoder wait on the host between samples (issue 32 item 5b).

On a CPU run the moves are no-ops, but the watch on a parked module is the same as on a GPU: any
use outside the sampling block is logged and brings the module back. So a run whose samples,
validation and save use neither while parked proves the run never needs them on the device.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from tests.helpers import DATA, ROOT, copy_images, small_run, train_in_process
from trainer.config import load_config
from trainer.data.dataset import DataSettings, load_data
from trainer.optim import load_optimizer_file
from trainer.parts.parking import Parking, park_after_caches, parked_modules
from trainer.plan import plan_memory
from trainer.plan.memory import Evaluator

USED_WHILE_PARKED = "used while parked"


def test_cached_vae_and_text_encoder_are_parked_and_only_sampling_fetches_them(tmp_path, caplog):
    data = copy_images(tmp_path / "data", 8)
    overrides = small_run(
        tmp_path,
        data_root=data,
        cache_latents=True,
        cache_text_encoder_outputs=True,
        disable_textenc_training=True,
        sample_prompts=str(ROOT / "data" / "sample_prompts.json"),
        sample_steps=2,
        validation_config=str(ROOT / "validation_default.json"),
        stop_at_step=2,
        no_save_ckpt=False,
        extract_lora_rank=4,  # its fidelity probe runs the (parked) text encoder at every save
    )
    with caplog.at_level(logging.INFO):
        summary, session = train_in_process(tmp_path, **overrides)
    assert summary.global_step == 2
    parking = session.observers.parking
    assert parking is not None and parking.parked == ("vae", "text_encoder")  # parked again after samples
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if USED_WHILE_PARKED in m]
    assert any("wrote" in m and "sample image" in m for m in messages)  # sampling ran (and fetched)
    assert any(m.startswith("validation at step") for m in messages)
    assert any(m.startswith("LoRA of checkpoint") for m in messages)  # written, its probe run
    captions = session.parts.data.every_caption()
    assert captions is not None and "" in captions
    assert len(session.step.text_cache) == len(captions)  # every caption encoded up front
    assert session.step.text_cache.misses == 0  # and none later


def test_a_use_while_parked_brings_the_module_back_and_says_so(caplog):
    module = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    parking = Parking({"text_encoder": module}, torch.device("cpu"))
    parking.park("text_encoder")
    with parking.fetched():
        assert parking.parked == ()
        module(torch.ones(1, 4))  # inside the block: no warning
    assert parking.parked == ("text_encoder",)
    assert USED_WHILE_PARKED not in caplog.text
    with caplog.at_level(logging.WARNING):
        module[0](torch.ones(1, 4))  # a child's forward, as a VAE's decode calls its decoder
    assert "text_encoder was used while parked" in caplog.text
    assert parking.parked == ()  # back on the device for the rest of the run


def test_every_caption_lists_fixed_captions_and_refuses_shuffled_ones(tmp_path):
    data = tmp_path / "data"
    copy_images(data, 4)
    logs = str(tmp_path / "logs")  # the data scan's cache goes under logdir
    cfg = load_config(
        str(ROOT / "train.json"),
        ["--data_root", str(data), "--keep_tokens_separator", "|||", "--logdir", logs],
    )
    first = sorted(data.glob("*.txt"))[0]
    first.write_text("fixed part ||| b, a ||| suffix")
    loaded = load_data(DataSettings.from_config(cfg))
    captions = loaded.every_caption()
    assert captions is not None and "" in captions
    assert "fixed part, b, a, suffix" in captions  # the separator never reaches the encoder
    assert len(captions) == 5
    image = sorted(data.glob("*.png"))[1]
    image.with_suffix(".yaml").write_text("main_prompt: a shape\ntags: [red, blue]\nshuffle_tags: true\n")
    assert load_data(DataSettings.from_config(cfg)).every_caption() is None


@pytest.mark.parametrize("cache_text", [False, True])
def test_the_plan_counts_parked_modules_at_sampling_not_in_the_step(tmp_path, cache_text):
    """On CUDA the parked frozen weights leave the resident categories and join the sampling
    moment (and the host table); on a CPU run, where the host is the device, nothing moves."""
    base = [
        *("--resume_ckpt", "builtin:tiny-sd1", "--resolution", "64", "--batch_size", "1"),
        *("--data_root", str(DATA), "--logdir", str(tmp_path / "logs")),
        *("--sample_prompts", str(ROOT / "data" / "sample_prompts.json")),
        *("--disable_textenc_training", "true", "--cache_text_encoder_outputs", str(cache_text).lower()),
    ]
    on = load_config(str(ROOT / "train.json"), [*base, "--cache_latents", "true"])
    off = load_config(str(ROOT / "train.json"), [*base, "--cache_latents", "false"])
    assert parked_modules(on) == (("vae", "text_encoder") if cache_text else ("vae",))
    assert parked_modules(off) == (("text_encoder",) if cache_text else ())
    opt = load_optimizer_file(on.optimizer_config)
    evaluator = Evaluator("cuda")
    parked, kept = (plan_memory(c, opt, device="cuda", evaluator=evaluator) for c in (on, off))
    moved = kept.sizes.frozen_weights - parked.sizes.frozen_weights  # the VAE's bytes
    assert moved > 0
    assert parked.sizes.sampling - kept.sizes.sampling == moved  # fetched back for the samples
    assert parked.host.categories["parked"] - kept.host.categories["parked"] == moved
    assert any("on the host between samples" in n for n in parked.notes)
    cpu_on, cpu_off = (plan_memory(c, opt, device="cpu") for c in (on, off))
    assert cpu_on.sizes.frozen_weights == cpu_off.sizes.frozen_weights > 0
    assert cpu_on.host.categories["parked"] == 0


def test_a_shuffling_folder_keeps_the_text_encoder_and_warns_that_the_plan_counted_it_off(tmp_path, caplog):
    """train.json keeps tags in order, so the plan (made before the data is read) parked the
    encoder; a folder's own shuffle_tags keeps it on the device, which the run must say. `meta`
    stands for a device other than the host (nothing is moved to it: only fetches would)."""
    from trainer.models import load_model

    data = tmp_path / "data"
    copy_images(data, 4)
    image = sorted(data.glob("*.png"))[0]
    image.with_suffix(".yaml").write_text("main_prompt: a shape\ntags: [red, blue]\nshuffle_tags: true\n")
    cfg = load_config(
        str(ROOT / "train.json"),
        [
            *("--data_root", str(data), "--logdir", str(tmp_path / "logs")),
            *("--cache_text_encoder_outputs", "true", "--disable_textenc_training", "true"),
        ],
    )
    assert parked_modules(cfg) == ("vae", "text_encoder")  # what the plan assumed
    loaded = load_data(DataSettings.from_config(cfg))
    with caplog.at_level(logging.INFO):
        parking = park_after_caches(
            cfg, model=load_model("builtin:tiny-sd1"), step=None, data=loaded, device=torch.device("meta")
        )
    assert parking.parked == ("vae",)
    assert "text encoder stays on meta: a folder of the data shuffles its tags" in caplog.text
    assert "counted it on the host" in caplog.text
