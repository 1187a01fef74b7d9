"""Caption and settings rules (EveryDream2-compatible): sidecars, yaml keys, folder files, merge
order, file-name captions, manifests, encodings."""

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from trainer.data.captions import Report, Settings, merge, parse_caption_text, settings_from_dict
from trainer.data.discovery import discover
from trainer.runtime.errors import DataError


def img(path: Path, size=(96, 80)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 30, 200)).save(path)
    return path


def write(path: Path, text: str, encoding="utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def by_name(result) -> dict:
    return {Path(i.path).name: i for i in result.items}


def test_caption_text_parsing_strips_dedupes_and_keeps_order():
    s = parse_caption_text("  a photo of ted ,  smiling, hat,smiling, , red hat ")
    assert s.main_prompts == ("a photo of ted",)
    assert [t for t, _ in s.tags] == ["smiling", "hat", "red hat"]
    assert parse_caption_text("   ") == Settings()


def test_merge_scalars_most_specific_wins_and_tags_union_most_specific_first():
    base = Settings(main_prompts=("g",), tags=(("a", 1.0), ("b", 2.0)), multiply=2.0, flip_p=0.5)
    over = Settings(main_prompts=("i",), tags=(("b", 5.0), ("c", 1.0)), multiply=3.0)
    m = merge(base, over)
    assert m.main_prompts == ("i", "g")
    assert m.tags == (("b", 5.0), ("c", 1.0), ("a", 1.0))
    assert m.multiply == 3.0 and m.flip_p == 0.5


def test_settings_dict_weighted_tags_nested_caption_and_bad_values(caplog):
    report = Report()
    data = {
        "caption": {"main_prompt": "nested main", "tags": ["n1"]},
        "tags": ["t1", {"tag": "t2", "weight": 3}, {"tag": "t3"}],
        "multiply": "lots",
        "flip_p": 1.5,
        "rating": 0.8,
        "mulitply": 2,
    }
    with caplog.at_level(logging.WARNING):
        s = settings_from_dict(data, "x.yaml", report)
    assert s.main_prompts == ("nested main",)
    assert s.tags == (("t1", 1.0), ("t2", 3.0), ("t3", 1.0), ("n1", 1.0))
    assert s.multiply is None and s.flip_p is None
    reasons = " | ".join(p.reason for p in report.problems)
    assert "'multiply' must be a number" in reasons and "'flip_p' must be in [0.0, 1.0]" in reasons
    assert all(p.path == "x.yaml" for p in report.problems)
    assert "did you mean 'multiply'" in caplog.text
    assert "'rating' is accepted" in caplog.text


def test_sidecar_precedence_txt_caption_yaml(tmp_path):
    img(tmp_path / "a.jpg")
    write(tmp_path / "a.txt", "from txt, t_txt")
    write(tmp_path / "a.caption", "from caption, t_cap")
    write(tmp_path / "a.yaml", "main_prompt: from yaml\ntags: [t_yaml]\nmultiply: 3\n")
    img(tmp_path / "b.png")
    write(tmp_path / "b.txt", "from txt")
    write(tmp_path / "b.caption", "from caption")
    items = by_name(discover(tmp_path))
    a = items["a.jpg"].caption
    # yaml is most specific; all sidecars merge, most specific tags first
    assert a.main_prompt == "from yaml"
    assert [t for t, _ in a.tags] == ["t_yaml", "t_cap", "t_txt"]
    assert items["a.jpg"].multiply == 3.0
    assert items["b.png"].caption.main_prompt == "from caption"


def test_per_image_json_is_not_a_caption_and_never_skips_the_image(tmp_path, caplog):
    """img2dataset writes a .json of download metadata beside each image; EveryDream2 reads
    captions only from .txt/.caption/.yaml/.yml and the file name."""
    img(tmp_path / "c_1.webp")
    write(tmp_path / "c_1.json", json.dumps({"main_prompt": "from json", "loss_scale": 0.5}))
    img(tmp_path / "d.jpg")
    write(tmp_path / "d.txt", "a dog")
    write(tmp_path / "d.json", '{"url": "http://example.invalid/d.jpg", "status": "success"')  # broken
    img(tmp_path / "e.png")
    write(tmp_path / "e.txt", "an elk, brown")
    write(tmp_path / "e.yaml", "tags: [unclosed\n")  # a broken yaml must not drop the .txt caption
    with caplog.at_level(logging.WARNING):
        result = discover(tmp_path)
    items = by_name(result)
    assert items["c_1.webp"].caption.main_prompt == "c" and items["c_1.webp"].loss_scale == 1.0
    assert items["d.jpg"].caption.main_prompt == "a dog"
    assert items["e.png"].caption.main_prompt == "an elk" and [t for t, _ in items["e.png"].caption.tags] == [
        "brown"
    ]
    assert [(Path(p.path).name, "kept" in p.reason) for p in result.problems] == [("e.yaml", True)]
    assert sum("per-image .json files are not read" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("text", ["", "  \n\t \r\n"], ids=["zero-bytes", "whitespace"])
def test_an_empty_caption_file_is_reported_and_the_image_keeps_its_file_name_caption(tmp_path, text):
    img(tmp_path / "red star_1.png")
    write(tmp_path / "red star_1.txt", text)
    img(tmp_path / "b.png")
    write(tmp_path / "b.caption", text)
    write(tmp_path / "b.yaml", "main_prompt: from yaml\n")
    result = discover(tmp_path)
    items = by_name(result)
    assert items["red star_1.png"].caption.main_prompt == "red star"  # EveryDream2's fallback, now said
    assert items["b.png"].caption.main_prompt == "from yaml"
    reasons = {Path(p.path).name: p.reason for p in result.problems}
    assert set(reasons) == {"red star_1.txt", "b.caption"}
    assert all("empty caption file" in r and "image kept" in r for r in reasons.values())


def test_filename_caption_only_when_nothing_else(tmp_path):
    img(tmp_path / "a photo of ted, sitting_1.jpg")
    img(tmp_path / "sub" / "dog_02.jpg")
    write(tmp_path / "sub" / "local.yaml", "main_prompt: folder prompt\n")
    items = by_name(discover(tmp_path))
    ted = items["a photo of ted, sitting_1.jpg"].caption
    assert ted.main_prompt == "a photo of ted" and ted.tags == (("sitting", 1.0),)
    assert items["dog_02.jpg"].caption.main_prompt == "folder prompt"


def test_global_inherited_local_not_and_merge_order(tmp_path):
    write(tmp_path / "global.yaml", "tags: [g_root]\nmultiply: 2\nflip_p: 0.1\ncond_dropout: 0.3\n")
    write(tmp_path / "local.yml", "loss_scale: 4\n")
    img(tmp_path / "root.jpg")
    write(tmp_path / "child" / "global.yml", "tags: [g_child]\nmultiply: 5\n")
    write(tmp_path / "child" / "local.yaml", "flip_p: 0.7\n")
    img(tmp_path / "child" / "c.jpg")
    write(tmp_path / "child" / "c.yaml", "cond_dropout: 0.0\ntags: [img_tag]\n")
    img(tmp_path / "child" / "grand" / "g.jpg")
    items = by_name(discover(tmp_path))
    root, c, g = items["root.jpg"], items["c.jpg"], items["g.jpg"]
    assert (root.multiply, root.flip_p, root.loss_scale) == (2.0, 0.1, 4.0)
    # child: child global over root global, local over global, image over local
    assert (c.multiply, c.flip_p, c.cond_dropout, c.loss_scale) == (5.0, 0.7, 0.0, 1.0)
    assert [t for t, _ in c.caption.tags] == ["img_tag", "g_child", "g_root"]
    # grandchild inherits both globals but neither local
    assert (g.multiply, g.flip_p, g.cond_dropout, g.loss_scale) == (5.0, 0.1, 0.3, 1.0)
    assert [t for t, _ in g.caption.tags] == ["g_child", "g_root"]


def test_folder_text_setting_files(tmp_path):
    d = tmp_path / "set"
    write(d / "multiply.txt", "2.5\n")
    write(d / "cond_dropout.txt", "0.2")
    write(d / "flip_p.txt", " 0.5 ")
    write(d / "loss_scale.txt", "-1")
    write(d / "batch_id.txt", "faces\n")
    write(d / "shuffle_tags.txt", "")
    img(d / "x.jpg")
    img(tmp_path / "plain.jpg")
    write(tmp_path / "bad" / "multiply.txt", "two")
    write(tmp_path / "bad" / "flip_p.txt", "3")
    img(tmp_path / "bad" / "y.jpg")
    result = discover(tmp_path)
    items = by_name(result)
    x = items["x.jpg"]
    assert (x.multiply, x.cond_dropout, x.flip_p, x.loss_scale, x.batch_id, x.shuffle_tags) == (
        2.5,
        0.2,
        0.5,
        -1.0,
        "faces",
        True,
    )
    plain = items["plain.jpg"]
    assert (plain.multiply, plain.flip_p, plain.shuffle_tags, plain.batch_id) == (
        1.0,
        None,
        None,
        "default_batch",
    )
    assert items["y.jpg"].multiply == 1.0 and items["y.jpg"].flip_p is None  # bad values ignored, image kept
    bad = {Path(p.path).name: p.reason for p in result.problems}
    assert "'multiply' must be a number, got 'two'" in bad["multiply.txt"]
    assert "'flip_p' must be in" in bad["flip_p.txt"]


def test_weighted_tags_sorted_by_weight_and_caption_length(tmp_path):
    img(tmp_path / "w.jpg")
    write(
        tmp_path / "w.yaml",
        "main_prompt: m\nmax_caption_length: 40\ntags:\n  - low\n  - {tag: high, weight: 3}\n  - {tag: mid, weight: 2}\n",
    )
    cap = by_name(discover(tmp_path))["w.jpg"].caption
    assert cap.tags == (("high", 3.0), ("mid", 2.0), ("low", 1.0))
    assert cap.max_caption_length == 40


@pytest.mark.parametrize(
    ("encoding", "text", "used"),
    [
        ("utf-8-sig", "café crème, naïve", None),
        ("cp1252", "café, “quoted” €", "cp1252"),
        ("latin-1", "caf\xe9, odd\x81byte", "latin-1"),  # 0x81 is undefined in cp1252
    ],
)
def test_legacy_encodings(tmp_path, caplog, encoding, text, used):
    img(tmp_path / "e.jpg")
    write(tmp_path / "e.txt", text, encoding)
    with caplog.at_level(logging.WARNING):
        cap = by_name(discover(tmp_path))["e.jpg"].caption
    assert cap.text == text
    if used is None:
        assert "not valid UTF-8" not in caplog.text
    else:
        assert f"e.txt is not valid UTF-8; read it as {used}" in caplog.text


def test_manifest_list_relative_paths_and_rich_entries(tmp_path):
    img(tmp_path / "imgs" / "a.jpg")
    img(tmp_path / "imgs" / "b.png")
    img(tmp_path / "imgs" / "c.jpg")
    img(tmp_path / "elsewhere" / "d_x.jpg")
    write(tmp_path / "caps" / "c.txt", "caption from file, cf")
    manifest = tmp_path / "meta" / "data.json"
    write(
        manifest,
        json.dumps(
            [
                {"image": "../imgs/a.jpg", "caption": "a caption, t1"},
                {
                    "image": "../imgs/b.png",
                    "main_prompt": "b main",
                    "tags": [{"tag": "w", "weight": 2}],
                    "multiply": 3,
                },
                {"image": "../imgs/c.jpg", "caption": "../caps/c.txt"},
                {"image": str(tmp_path / "elsewhere" / "d_x.jpg")},
                {"image": "../imgs/missing.jpg", "caption": "x"},
                {"caption": "no image"},
            ]
        ),
    )
    result = discover(manifest)
    items = by_name(result)
    assert sorted(items) == ["a.jpg", "b.png", "c.jpg", "d_x.jpg"]
    assert items["a.jpg"].caption.text == "a caption, t1"
    assert items["b.png"].caption.main_prompt == "b main" and items["b.png"].multiply == 3.0
    assert items["b.png"].caption.tags == (("w", 2.0),)
    assert items["c.jpg"].caption.text == "caption from file, cf"
    assert items["d_x.jpg"].caption.main_prompt == "d"
    reasons = {Path(p.path).name: p.reason for p in result.problems}
    assert "no such file" in reasons["missing.jpg"]
    assert any("entry 5" in p.path and "'image' path" in p.reason for p in result.problems)


def test_list_data_root_folder_plus_manifest(tmp_path):
    img(tmp_path / "f" / "one.jpg")
    img(tmp_path / "m" / "two.jpg")
    manifest = write(tmp_path / "m" / "list.json", json.dumps([{"image": "two.jpg", "caption": "two"}]))
    result = discover([tmp_path / "f", str(manifest)])
    assert [Path(i.path).name for i in result.items] == ["one.jpg", "two.jpg"]
    dup = discover([tmp_path / "f", tmp_path / "f"])
    assert len(dup.items) == 1 and "more than once" in dup.problems[0].reason


def test_malformed_manifest_and_bad_roots_raise(tmp_path):
    bad = write(tmp_path / "bad.json", "{not json")
    with pytest.raises(DataError, match="bad.json is not valid JSON"):
        discover(bad)
    obj = write(tmp_path / "obj.json", json.dumps({"image": "a.jpg"}))
    with pytest.raises(DataError, match="must be a JSON list"):
        discover(obj)
    with pytest.raises(DataError, match="does not exist"):
        discover(tmp_path / "nope")
    with pytest.raises(DataError, match="neither a folder nor a .json manifest"):
        discover(write(tmp_path / "x.csv", "a,b"))
    with pytest.raises(DataError, match="empty list"):
        discover([])
