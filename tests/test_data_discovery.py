"""Discovery: file types, hidden files, symlink loops, sorting, EXIF sizes, scan cache, errors."""

import json
import os
import random
from pathlib import Path

import pytest
from PIL import Image

from trainer.data import image_probe
from trainer.data.discovery import DiscoveryResult, discover, require_trainable
from trainer.data.items import Problem
from trainer.runtime.errors import DataError


def img(path: Path, size=(96, 80), fmt=None, **save_kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 200, 30)).save(path, format=fmt, **save_kw)
    return path


def names(result) -> list[str]:
    return [Path(i.path).name for i in result.items]


def test_image_types_case_insensitive_and_others_ignored(tmp_path):
    img(tmp_path / "a.JPG", fmt="JPEG")
    img(tmp_path / "b.jpeg")
    img(tmp_path / "c.Png", fmt="PNG")
    img(tmp_path / "d.webp")
    img(tmp_path / "e.bmp")
    img(tmp_path / "f.jfif", fmt="JPEG")
    img(tmp_path / "g.gif")
    img(tmp_path / "h.tiff")
    (tmp_path / "notes.md").write_text("hi")
    result = discover(tmp_path)
    assert names(result) == ["a.JPG", "b.jpeg", "c.Png", "d.webp", "e.bmp", "f.jfif"]
    assert result.problems == []
    assert all(os.path.isabs(i.path) for i in result.items)


def test_hidden_files_and_folders_skipped(tmp_path):
    img(tmp_path / "seen.jpg")
    img(tmp_path / ".hidden.jpg")
    img(tmp_path / ".cache" / "x.jpg")
    img(tmp_path / "sub" / ".ipynb_checkpoints" / "y.jpg")
    (tmp_path / ".global.yaml").write_text("multiply: 9")
    result = discover(tmp_path)
    assert names(result) == ["seen.jpg"]
    assert result.items[0].multiply == 1.0


def test_symlink_loop_and_alias_visited_once(tmp_path):
    img(tmp_path / "a" / "one.jpg")
    img(tmp_path / "a" / "b" / "two.jpg")
    os.symlink(tmp_path / "a", tmp_path / "a" / "b" / "loop")  # loop back to an ancestor
    os.symlink(tmp_path / "a" / "b", tmp_path / "alias")  # second path to the same folder
    result = discover(tmp_path)
    assert sorted(names(result)) == ["one.jpg", "two.jpg"]


def test_sorted_and_deterministic_regardless_of_creation_order(tmp_path):
    files = [f"{d}/{n}.jpg" for d in ("z", "a", "m/q") for n in ("b", "A", "c_1", "a")]
    results = []
    for run in range(2):
        root = tmp_path / f"r{run}"
        order = list(files)
        random.Random(run).shuffle(order)
        for f in order:
            img(root / f)
        results.append([os.path.relpath(i.path, root) for i in discover(root, workers=3).items])
    assert results[0] == results[1] == sorted(results[0])
    assert len(results[0]) == len(files)


@pytest.mark.parametrize(
    ("orientation", "expected"), [(1, (120, 64)), (3, (120, 64)), (6, (64, 120)), (8, (64, 120))]
)
def test_exif_orientation_swaps_displayed_size(tmp_path, orientation, expected):
    exif = Image.Exif()
    exif[0x0112] = orientation
    img(tmp_path / "r.jpg", size=(120, 64), exif=exif.tobytes())
    item = discover(tmp_path).items[0]
    assert (item.width, item.height) == expected


def test_scan_cache_second_run_opens_no_image(tmp_path, monkeypatch):
    data = tmp_path / "data"
    for i in range(6):
        img(data / f"{i}.jpg", size=(64 + 8 * i, 72))
    cache = tmp_path / "cache" / "scan.json"
    first = discover(data, scan_cache=cache)
    assert cache.is_file() and len(json.loads(cache.read_text())["entries"]) == 6

    def no_open(*args, **kwargs):
        raise AssertionError(f"image re-opened despite the cache: {args}")

    monkeypatch.setattr(image_probe.Image, "open", no_open)
    second = discover(data, scan_cache=cache)
    assert second.items == first.items and second.problems == []

    # a changed file (size/mtime) is probed again; the others still come from the cache
    monkeypatch.undo()
    img(data / "3.jpg", size=(200, 100))
    opened = []
    real_probe = image_probe.probe_image
    monkeypatch.setattr("trainer.data.discovery.probe_image", lambda p: opened.append(p) or real_probe(p))
    third = discover(data, scan_cache=cache)
    assert [Path(p).name for p in opened] == ["3.jpg"]
    assert {(Path(i.path).name, i.width) for i in third.items} >= {("3.jpg", 200)}


def test_scan_cache_prunes_deleted_and_survives_corruption(tmp_path, caplog):
    data = tmp_path / "data"
    img(data / "keep.jpg")
    gone = img(data / "gone.jpg")
    cache = tmp_path / "scan.json"
    discover(data, scan_cache=cache)
    gone.unlink()
    discover(data, scan_cache=cache)
    assert [Path(k).name for k in json.loads(cache.read_text())["entries"]] == ["keep.jpg"]
    cache.write_text("{truncated")
    result = discover(data, scan_cache=cache)
    assert names(result) == ["keep.jpg"]
    assert "scan cache" in caplog.text and "unusable" in caplog.text
    assert json.loads(cache.read_text())["version"] == image_probe.CACHE_VERSION


def test_min_side_threshold_is_a_parameter(tmp_path):
    img(tmp_path / "small.jpg", size=(40, 300))
    img(tmp_path / "ok.jpg", size=(300, 300))
    assert names(discover(tmp_path)) == ["ok.jpg"]
    assert names(discover(tmp_path, min_side=32)) == ["ok.jpg", "small.jpg"]


def test_require_trainable_explains_why(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"has 0 images: no files with extensions .*\.jpg"):
        require_trainable(discover(tmp_path / "empty"), tmp_path / "empty")
    bad = DiscoveryResult(
        items=[], problems=[Problem(f"/d/{i}.jpg", "empty file (0 bytes)") for i in range(7)]
    )
    with pytest.raises(
        DataError, match=r"has 0 images: 7 problems found: /d/0.jpg: empty file .*\(and 2 more\)"
    ):
        require_trainable(bad, "/d")
    require_trainable(discover(img(tmp_path / "one" / "x.jpg").parent), "x")  # no raise
