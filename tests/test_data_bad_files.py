"""Bad input never stops the scan: every bad file is reported once by path with a reason,
valid-but-unusual images (CMYK, 16-bit, palette+alpha) are kept."""

import io
import os
import random
import struct
import zlib
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from trainer.data.discovery import discover, require_trainable
from trainer.runtime.errors import DataError


def noisy(size=(256, 256), mode="RGB") -> Image.Image:
    rng = random.Random(0)
    return Image.frombytes(mode, size, rng.randbytes(size[0] * size[1] * len(mode)))


def encoded(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A syntactically valid PNG declaring a huge size (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


def build_bad_folder(root: Path) -> tuple[set[str], set[str]]:
    """Returns (names expected to be reported, names expected to be kept)."""
    root.mkdir()
    jpeg, png = encoded(noisy(), "JPEG"), encoded(noisy(), "PNG")
    (root / "corrupt.jpg").write_bytes(b"this is not an image at all" * 10)
    (root / "garbage_after_header.png").write_bytes(png[:64] + b"\x00" * 500)
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "truncated.png").write_bytes(png[: int(len(png) * 0.6)])
    (root / "empty.png").write_bytes(b"")
    Image.new("RGB", (1, 1)).save(root / "tiny.png")
    (root / "bomb_error.png").write_bytes(png_header_only(20000, 20000))  # > 2x MAX_IMAGE_PIXELS
    (root / "bomb_warning.png").write_bytes(png_header_only(10000, 9500))  # > MAX_IMAGE_PIXELS
    (root / "broken_yaml.jpg").write_bytes(jpeg)
    (root / "broken_yaml.yaml").write_text("main_prompt: [unclosed\ntags: {")
    os.symlink(root / "no_such_target.jpg", root / "dangling.jpg")
    # valid and kept:
    noisy((96, 96), "CMYK").save(root / "cmyk.jpg")
    Image.new("I;16", (96, 80), 40000).save(root / "sixteen_bit.png")
    pal = Image.new("P", (80, 96))
    pal.putpalette([0, 0, 0, 255, 0, 0] * 128)
    pal.info["transparency"] = 0
    pal.save(root / "palette_alpha.png", transparency=0)
    Image.new("LA", (80, 80)).save(root / "gray_alpha.png")
    (root / "good.jpg").write_bytes(jpeg)
    bad = {
        "corrupt.jpg",
        "garbage_after_header.png",
        "truncated.jpg",
        "truncated.png",
        "empty.png",
        "tiny.png",
        "bomb_error.png",
        "bomb_warning.png",
        "broken_yaml.yaml",
        "dangling.jpg",
    }
    good = {"cmyk.jpg", "sixteen_bit.png", "palette_alpha.png", "gray_alpha.png", "good.jpg"}
    return bad, good


def test_every_bad_file_reported_once_good_ones_kept(tmp_path):
    bad, good = build_bad_folder(tmp_path / "data")
    sub = tmp_path / "data" / "settings"
    sub.mkdir()
    (sub / "multiply.txt").write_text("three")
    (sub / "local.yaml").write_text("flip_p: [0.5\n")
    (sub / "kept.jpg").write_bytes(encoded(noisy((80, 80)), "JPEG"))
    bad |= {"multiply.txt", "local.yaml"}
    good.add("kept.jpg")

    result = discover(tmp_path / "data", workers=4)

    reported = Counter(Path(p.path).name for p in result.problems)
    assert set(reported) == bad
    assert all(n == 1 for n in reported.values()), reported
    assert {Path(i.path).name for i in result.items} == good
    reasons = {Path(p.path).name: p.reason for p in result.problems}
    assert "0 bytes" in reasons["empty.png"]
    assert "too small to train: 1x1 px (min_side=64" in reasons["tiny.png"]
    assert "not an image" in reasons["corrupt.jpg"]
    assert "image file is truncated" in reasons["truncated.jpg"]
    assert "corrupt or truncated" in reasons["truncated.png"]
    assert "image too large" in reasons["bomb_error.png"] and "MAX_IMAGE_PIXELS" in reasons["bomb_error.png"]
    assert "image too large" in reasons["bomb_warning.png"]
    assert (
        "malformed YAML" in reasons["broken_yaml.yaml"]
        and "broken_yaml.jpg skipped" in reasons["broken_yaml.yaml"]
    )
    assert "'multiply' must be a number, got 'three'" in reasons["multiply.txt"]
    assert "malformed YAML" in reasons["local.yaml"] and "ignored" in reasons["local.yaml"]
    assert "broken symbolic link" in reasons["dangling.jpg"]
    kept = next(i for i in result.items if i.path.endswith("kept.jpg"))
    assert kept.multiply == 1.0 and kept.flip_p is None
    sizes = {Path(i.path).name: (i.width, i.height) for i in result.items}
    assert sizes["sixteen_bit.png"] == (96, 80) and sizes["palette_alpha.png"] == (80, 96)


def test_bad_results_are_cached_and_reported_again(tmp_path, monkeypatch):
    bad, _ = build_bad_folder(tmp_path / "data")
    cache = tmp_path / "scan.json"
    first = discover(tmp_path / "data", scan_cache=cache)
    from trainer.data import image_probe

    monkeypatch.setattr(
        image_probe.Image, "open", lambda *a, **k: pytest.fail("opened an image despite cache")
    )
    second = discover(tmp_path / "data", scan_cache=cache)
    assert sorted(map(str, second.problems)) == sorted(map(str, first.problems))
    assert second.items == first.items


def test_all_bad_dataset_raises_with_reasons(tmp_path):
    d = tmp_path / "x"
    d.mkdir()
    (d / "a.jpg").write_bytes(b"")
    (d / "b.png").write_bytes(b"nope")
    result = discover(d)
    assert result.items == []
    with pytest.raises(
        DataError, match=r"has 0 images: 2 problems found: .*a.jpg: empty file .*b.png: not an image"
    ):
        require_trainable(result, d)


def test_unreadable_file_is_reported_not_cached(tmp_path):
    if os.geteuid() == 0:
        pytest.skip(
            "running as root: chmod 000 does not stop root from reading, so this case cannot be produced"
        )
    d = tmp_path / "d"
    d.mkdir()
    locked = d / "locked.jpg"
    locked.write_bytes(encoded(noisy((80, 80)), "JPEG"))
    locked.chmod(0)
    cache = tmp_path / "scan.json"
    try:
        result = discover(d, scan_cache=cache)
        assert [(Path(p.path).name, "Permission denied" in p.reason) for p in result.problems] == [
            ("locked.jpg", True)
        ]
        locked.chmod(0o644)
        assert [Path(i.path).name for i in discover(d, scan_cache=cache).items] == ["locked.jpg"]
    finally:
        locked.chmod(0o644)


def test_permission_error_reported_and_not_cached_simulated(tmp_path, monkeypatch):
    """Runs even as root: the probe's PermissionError path, simulated at Image.open."""
    from trainer.data import image_probe

    d = tmp_path / "d"
    d.mkdir()
    (d / "locked.jpg").write_bytes(encoded(noisy((80, 80)), "JPEG"))
    cache = tmp_path / "scan.json"
    real_open = image_probe.Image.open

    def deny(path, *a, **k):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(image_probe.Image, "open", deny)
    result = discover(d, scan_cache=cache)
    assert len(result.problems) == 1 and "cannot read: Permission denied" in result.problems[0].reason
    monkeypatch.setattr(image_probe.Image, "open", real_open)
    assert [Path(i.path).name for i in discover(d, scan_cache=cache).items] == ["locked.jpg"]
