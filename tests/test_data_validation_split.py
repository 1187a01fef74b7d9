"""Validation config parsing and the train/validation/stabilize split."""

import json
import math
import random
from pathlib import Path

import pytest
from PIL import Image

from trainer.data.items import CaptionSpec, ImageItem
from trainer.data.validation_split import (
    DataSplit,
    ValidationConfig,
    load_validation_config,
    split_dataset,
)
from trainer.runtime.errors import ConfigError, DataError


def items(n: int, prefix="/data") -> list[ImageItem]:
    return [
        ImageItem(
            f"{prefix}/{i:03d}.jpg", 64, 64, CaptionSpec(f"c{i}"), multiply=2.0, flip_p=0.5, cond_dropout=0.1
        )
        for i in range(n)
    ]


def img(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (80, 80)).save(path)
    return path


def paths(xs) -> set[str]:
    return {i.path for i in xs}


def assert_disjoint(split: DataSplit):
    train = paths(split.train)
    for name, v in split.val.items():
        assert not train & paths(v), f"validation set {name} overlaps training"


def test_automatic_split_proportion_disjoint_and_val_settings():
    data = items(40)
    split, problems = split_dataset(data, ValidationConfig(auto_split_proportion=0.2))
    assert problems == []
    assert len(split.val["val"]) == math.ceil(0.2 * 40) == 8
    assert len(split.train) == 32 and paths(split.train) | paths(split.val["val"]) == paths(data)
    assert_disjoint(split)
    assert all(i.multiply == 1.0 and i.flip_p == 0.0 and i.cond_dropout == 0.0 for i in split.val["val"])
    assert all(i.multiply == 2.0 for i in split.train)  # training items untouched
    assert [i.path for i in split.train] == sorted(i.path for i in split.train)
    assert split.stabilize == []


def test_split_is_seeded_and_independent_of_input_order_and_global_rng():
    data = items(30)
    cfg = ValidationConfig(seed=7)
    random.seed(1)
    a, _ = split_dataset(data, cfg)
    shuffled = list(data)
    random.Random(3).shuffle(shuffled)
    random.seed(99)
    b, _ = split_dataset(shuffled, cfg)
    assert paths(a.val["val"]) == paths(b.val["val"])
    c, _ = split_dataset(data, ValidationConfig(seed=8))
    assert paths(c.val["val"]) != paths(a.val["val"])
    # EveryDream2 picks the same images: random.seed(seed); shuffle(sorted(items))
    expected = sorted(data, key=lambda i: i.path)
    random.Random(7).shuffle(expected)
    assert paths(a.val["val"]) == paths(expected[: math.ceil(0.15 * 30)])


def test_at_least_one_and_never_all():
    split, _ = split_dataset(items(3), ValidationConfig(auto_split_proportion=0.01))
    assert len(split.val["val"]) == 1 and len(split.train) == 2
    with pytest.raises(DataError, match="leaving none to train on"):
        split_dataset(items(1), ValidationConfig())


def test_none_and_disabled_and_no_config():
    data = items(5)
    for cfg in (None, ValidationConfig(val_split_mode="none"), ValidationConfig(validate_training=False)):
        split, _ = split_dataset(data, cfg)
        assert paths(split.train) == paths(data) and split.val == {}


def test_stabilize_subset_is_trained_on():
    split, _ = split_dataset(
        items(50), ValidationConfig(stabilize_training_loss=True, stabilize_split_proportion=0.2)
    )
    assert len(split.stabilize) == math.ceil(0.2 * len(split.train))
    assert paths(split.stabilize) <= paths(split.train)
    assert not paths(split.stabilize) & paths(split.val["val"])
    assert all(i.multiply == 1.0 and i.flip_p == 0.0 for i in split.stabilize)


def test_manual_folder_extra_datasets_and_overlap_removed(tmp_path):
    train_root = tmp_path / "train"
    train = [img(train_root / f"t{i}.jpg") for i in range(4)]
    for i in range(3):
        img(tmp_path / "val" / f"v{i}.jpg")
    img(tmp_path / "hard" / "h0.jpg")
    (tmp_path / "val" / "shared.jpg").symlink_to(train[0])  # same image also in training
    train_items = [ImageItem(str(p), 80, 80, CaptionSpec("x")) for p in train]
    cfg = ValidationConfig(
        val_split_mode="manual",
        manual_data_root=str(tmp_path / "val"),
        extra_manual_datasets={"hard": str(tmp_path / "hard")},
    )
    split, problems = split_dataset(train_items, cfg, scan_cache=tmp_path / "cache.json")
    assert sorted(Path(i.path).name for i in split.val["val"]) == ["shared.jpg", "v0.jpg", "v1.jpg", "v2.jpg"]
    assert [Path(i.path).name for i in split.val["hard"]] == ["h0.jpg"]
    assert [Path(i.path).name for i in split.train] == ["t1.jpg", "t2.jpg", "t3.jpg"]
    assert [(Path(p.path).name, "not trained on" in p.reason) for p in problems] == [("t0.jpg", True)]
    assert all(i.flip_p == 0.0 and i.multiply == 1.0 for v in split.val.values() for i in v)
    assert (tmp_path / "cache.json").is_file()


def test_manual_empty_folder_is_an_error(tmp_path):
    (tmp_path / "val").mkdir()
    cfg = ValidationConfig(val_split_mode="manual", manual_data_root=str(tmp_path / "val"))
    with pytest.raises(DataError, match="validation_config 'manual_data_root'.*0 images"):
        split_dataset(items(4), cfg)


def test_load_config_legacy_keys_defaults_and_errors(tmp_path, caplog):
    assert load_validation_config(None) is None
    ed2 = tmp_path / "validation_default.json"
    ed2.write_text(
        json.dumps(
            {
                "documentation": {"validate_training": "help text"},
                "validate_training": True,
                "val_split_mode": "automatic",
                "val_data_root": None,
                "val_split_proportion": 0.2,
                "stabilize_training_loss": False,
                "stabilize_split_proportion": 0.15,
                "every_n_epochs": 1,
                "seed": 555,
                "use_relative_loss": False,
            }
        )
    )
    cfg = load_validation_config(ed2)
    assert cfg.auto_split_proportion == 0.2 and cfg.manual_data_root is None and cfg.seed == 555
    assert "use_relative_loss" in caplog.text
    d = ValidationConfig()
    assert (d.val_split_mode, d.auto_split_proportion, d.every_n_epochs, d.seed, d.batch_size) == (
        "automatic",
        0.15,
        1.0,
        555,
        None,
    )

    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"auto_split_proportoin": 0.1}))
    with pytest.raises(
        ConfigError,
        match=r"typo.json: unknown key 'auto_split_proportoin' \(did you mean 'auto_split_proportion'",
    ):
        load_validation_config(typo)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"val_split_mode": "random", "auto_split_proportion": 1.5}))
    with pytest.raises(ConfigError, match=r"bad.json: 'val_split_mode'.*'random'.*'auto_split_proportion'"):
        load_validation_config(bad)
    manual = tmp_path / "manual.json"
    manual.write_text(json.dumps({"val_split_mode": "manual"}))
    with pytest.raises(ConfigError, match="needs 'manual_data_root'"):
        load_validation_config(manual)
    both = tmp_path / "both.json"
    both.write_text(json.dumps({"val_split_proportion": 0.1, "auto_split_proportion": 0.2}))
    with pytest.raises(ConfigError, match="both 'val_split_proportion'"):
        load_validation_config(both)
