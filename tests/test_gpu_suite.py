"""bench/gpu_suite.py --dry-run: the GPU suite runs end to end on CPU with tiny models (issue 18)."""

from __future__ import annotations

import json

from tests.test_bench import _load


def test_gpu_suite_dry_run_writes_every_part(tmp_path, builtin_cache):
    suite = _load("gpu_suite")
    assert suite.main(["--dry-run", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    tests = report["correctness"]
    # No CUDA here: every cuda-marked test is collected and skipped, none silently dropped.
    assert tests["tests"] == tests["skipped"] > 0 and tests["failed"] == 0
    assert set(report["throughput"]) == {"unet_cached", "full_finetune_pixels"}
    for result in report["throughput"].values():
        assert result["status"] == "measured" and result["model_flops_per_image"] > 0
    assert report["throughput"]["full_finetune_pixels"]["trained"].keys() == {"unet", "text_encoder"}
    assert report["throughput"]["unet_cached"]["trained"].keys() == {"unet"}
    lowvram = report["memory"]["lowvram_sd15"]
    assert lowvram["status"] == "measured"
    assert {"fused_backward", "bf16_weights", "gradient_checkpointing", "cache_latents"} <= {
        k for k, v in lowvram["config"].items() if v is True
    }
    groups = {s["group"] for s in report["speedups"]}
    assert {"compile", "channels_last", "fused kernels", "SDPA", "TF32", "stalls"} <= groups
    measured = [s for s in report["speedups"] if s["ratio"] is not None]
    assert len(measured) >= 8 and all(s["ratio"] > 0 for s in measured)
    table = (tmp_path / "gpu_suite.md").read_text()
    assert table.count("\n| ") >= 4 + len(report["speedups"]) and "DRY RUN" in table
