"""Preview CLI: text and JSON reports list every image with its bucket and caption."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from trainer.data.preview import main


def _dataset(root: Path) -> dict[str, str]:
    captions = {}
    for k, size in enumerate([(140, 130), (140, 130), (270, 70), (100, 90)]):
        name = f"img{k}"
        Image.new("RGB", size, (k * 40, 10, 10)).save(root / f"{name}.png")
        captions[name] = f"picture {k}, tag a, tag b"
        (root / f"{name}.txt").write_text(captions[name])
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    return captions


def test_preview_json_lists_every_image(tmp_path, capsys):
    captions = _dataset(tmp_path)
    assert main(["--data_root", str(tmp_path), "--resolution", "128", "--batch_size", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    by_name = {Path(img["path"]).stem: img for img in report["images"]}
    assert set(by_name) == set(captions)  # the broken file is not trained
    for name, img in by_name.items():
        assert img["caption"] == captions[name]
    assert by_name["img2"]["bucket"] == [256, 64]
    assert by_name["img0"]["bucket"] == [128, 128]
    assert report["image_count"] == 4
    assert sum(b["images"] for b in report["buckets"]) == 4
    assert report["batches_per_epoch"] == sum(b["batches_epoch0"] for b in report["buckets"]) == 3
    reasons = {Path(p["path"]).name: p for p in report["problems"]}
    assert reasons["broken.jpg"]["severity"] == "skipped"
    assert reasons["img3.png"]["severity"] == "warning"  # 100x90 is upscaled to 128x128


def test_preview_text_cli(tmp_path):
    _dataset(tmp_path)
    cmd = [sys.executable, "-m", "trainer.data.preview", "--data_root", str(tmp_path), "--resolution", "128"]
    ok = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "4 training images" in ok.stdout and "broken.jpg" in ok.stdout and "128 x 128" in ok.stdout


def test_preview_bad_resolution_names_key(tmp_path, capsys):
    _dataset(tmp_path)
    assert main(["--data_root", str(tmp_path), "--resolution", "500"]) == 2
    assert "resolution" in capsys.readouterr().err


def test_preview_reports_images_without_a_mask_once(tmp_path, capsys):
    _dataset(tmp_path)
    Image.new("L", (140, 130), 255).save(tmp_path / "img0-masklabel.png")
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"data_root": str(tmp_path), "resolution": 128, "masked_loss": True}))
    assert main(["--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert "4 training images" in text  # the mask file is not an image
    assert "masks (file): 1 with a mask, 3 without (full weight)" in text
    assert [line.strip() for line in text.splitlines() if "no mask:" in line] == [
        f"no mask: {tmp_path / name}" for name in ("img1.png", "img2.png", "img3.png")
    ]
    assert main(["--config", str(config), "--json"]) == 0
    masks = json.loads(capsys.readouterr().out)["masks"]
    assert masks["with_mask"] == 1 and len(masks["without_mask"]) == 3
