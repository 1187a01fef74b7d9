"""Smoke test of bench/step.py and bench/compare.py on tiny-sd1 (no timing is asserted)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_step_bench_writes_all_figures(tmp_path, builtin_cache):
    out = tmp_path / "step.json"
    argv = ["--model", "builtin:tiny-sd1", "--resolution", "64", "--batch_size", "2", "--optimizer", "adamw"]
    argv += ["--warmup", "1", "--steps", "1", "--peak_tflops", "1.0", "--json", str(out), "--device", "cpu"]
    assert _load("step").main(argv + ["--breakdown"]) == 0
    result = json.loads(out.read_text())
    for key in (
        "seconds_per_step_median",
        "images_per_s",
        "model_flops_per_image",
        "mfu",
        "memory",
        "machine",
        "date",
        "config",
    ):
        assert key in result, key
    assert result["seconds_per_step_median"] > 0
    assert math.isclose(result["images_per_s"], 2 / result["seconds_per_step_median"], rel_tol=1e-3)
    assert result["model_flops_per_image"] > 1e8  # tiny UNet + TE + VAE encode at 64 px: ~0.5 GFLOP
    expected_mfu = result["model_flops_per_image"] * result["images_per_s"] / 1e12
    assert math.isclose(result["mfu"], expected_mfu, rel_tol=1e-2)
    assert result["memory"]["peak_rss_mib"] > 0
    assert set(result["trained"]) == {"unet", "text_encoder"}
    # the phases of the breakdown are disjoint parts of the step: all present, within its time
    phases = result["breakdown"]["phases"]
    assert {"text encode", "VAE encode", "UNet forward", "UNet backward", "TE backward", "optimizer"} <= set(
        phases
    )
    assert sum(phases.values()) <= result["breakdown"]["seconds_per_step"] + 1e-4


def test_loop_bench_writes_the_issue_configuration(tmp_path):
    """bench/loop.py's generated work: 20 captioned 256 px images and a train.json that the
    trainer accepts, UNet and text encoder trained, VAE encode every step, nothing besides."""
    from trainer.config import load_config
    from trainer.data import DataSettings, load_data

    loop = _load("loop")
    args = loop.build_parser().parse_args([])
    loop.write_images(tmp_path / "images", args.images, args.resolution)
    cfg = load_config(str(loop.write_config(tmp_path, args, 5)), [])
    assert (cfg.resolution, cfg.batch_size, cfg.max_epochs, cfg.lr) == (256, 4, 5, 1e-4)
    assert not cfg.cache_latents and not cfg.disable_textenc_training and cfg.mixed_precision == "no"
    assert cfg.sample_prompts is None and cfg.validation_config is None
    data = load_data(DataSettings(data_root=cfg.data_root, resolution=256, batch_size=4))
    assert len(data.train_items) == 20 and data.batches_per_epoch() == 5
    assert all(item.caption.text.startswith("a ") for item in data.train_items)


def test_compare_runs_variants_with_ratios(tmp_path, builtin_cache, capsys):
    out = tmp_path / "cmp.json"
    argv = ["--resolution", "64", "--warmup", "0", "--steps", "1", "--device", "cpu", "--json", str(out)]
    argv += ["--optimizer", "adamw", "--no_flops"]
    argv += ["--variant", "base=--freeze_text_encoder", "--variant", "cached=--cache_latents --cache_text"]
    assert _load("compare").main(argv) == 0
    results = json.loads(out.read_text())
    assert list(results) == ["base", "cached"]
    assert results["cached"]["trained"] == {"unet": results["base"]["trained"]["unet"]}
    printed = capsys.readouterr().out
    assert "speed-up" in printed and " 1.00x " in printed  # the first variant is the reference


def test_pin_wheels_replaces_another_diffusers_release_and_keeps_the_pinned_one(tmp_path, capsys):
    """The GPU machine gets the diffusers release this environment tested, not the newest."""
    pin = _load("pin_wheels")
    files = [
        "diffusers-0.99.0-py3-none-any.whl",
        "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl",
        "lion_pytorch-0.2.3-py3-none-any.whl",
    ]
    stale, missing = pin.plan_changes(files, {"diffusers": "0.42.1"})
    assert stale == ["diffusers-0.99.0-py3-none-any.whl"] and missing == {"diffusers": "0.42.1"}
    files.append("diffusers-0.42.1-py3-none-any.whl")
    assert pin.plan_changes(files, {"diffusers": "0.42.1"}) == (stale, {})  # nothing to download
    assert pin.wanted_versions([]) == {"diffusers": importlib.metadata.version("diffusers")}
    with pytest.raises(SystemExit, match="NAME==VERSION"):
        pin.wanted_versions(["diffusers"])
    for name in files:
        (tmp_path / name).write_bytes(b"")
    assert pin.main(["diffusers==0.42.1", "--wheels", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would remove diffusers-0.99.0" in out and "download" not in out
    assert (tmp_path / "diffusers-0.99.0-py3-none-any.whl").exists()  # a dry run changes nothing
