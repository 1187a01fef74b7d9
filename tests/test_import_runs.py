"""An imported kohya_ss configuration trains (issue 29 item 6).

The fixture is a kohya_ss GUI file as people publish it (a PDXL LoRA recipe, `"xformers":
"xformers"`). Where xformers is not installed the import maps it to PyTorch SDPA and says so,
and `python train.py` on the imported train.json (pointed at builtin:tiny-sd1 and four bundled
images) trains to the end instead of stopping after the model load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT, copy_images
from trainer.importing.command import main as import_main

FIXTURE = Path(__file__).parent / "fixtures" / "kohya" / "gui_pdxl_lora_xformers.json"


def test_the_imported_kohya_xformers_config_trains_where_xformers_is_absent(tmp_path, monkeypatch, capsys):
    import trainer.importing.map_options as map_options

    monkeypatch.setattr(map_options, "xformers_installed", lambda: False)  # this machine, made explicit
    out = tmp_path / "imported"
    assert import_main([str(FIXTURE), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    (row,) = [line for line in table.splitlines() if line.startswith("| `xformers` ")]
    assert "`train.json attn_type = sdp`" in row and "xformers is not installed here" in row
    train = json.loads((out / "train.json").read_text())
    assert train["attn_type"] == "sdp"

    overrides = {  # what makes it tiny, and what a CPU needs: the recipe's fp16 wants a GPU
        "resume_ckpt": "builtin:tiny-sd1",
        "data_root": copy_images(tmp_path / "images", 4),
        "resolution": "64",
        "max_epochs": "1",
        "logdir": str(tmp_path / "logs"),
        "project_name": "pdxl",
        "mixed_precision": "no",
    }
    argv = [item for key, value in overrides.items() for item in (f"--{key}", value)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(out / "train.json"), *argv]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "attention: unet: sdp" in proc.stderr
    assert "run finished: 2 optimizer steps, 1 epochs" in proc.stderr  # 4 images, the recipe's batch 3
    (run,) = (tmp_path / "logs").glob("pdxl-*")
    effective = json.loads((run / "train_effective.json").read_text())
    assert (effective["attn_type"], effective["cache_latents"], effective["clip_skip"]) == ("sdp", True, 2)
    assert list((run / "checkpoints").glob("pdxl-*/manifest.json"))
