"""The built-in model cache: an entry is used only when complete; a DDP rank builds it whole."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file

from trainer.models import builtin


@pytest.fixture
def cold_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SDTRAINER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _weights(folder):
    return {
        f"{comp}/{k}": v
        for comp, fname in builtin._WEIGHTS.items()
        for k, v in load_file(str(folder / comp / fname)).items()
    }


def test_an_incomplete_entry_is_rebuilt_not_loaded(builtin_cache, cold_cache, monkeypatch, caplog):
    """The folder a rank != 0 left behind before the fix: everything but the text-encoder weights."""
    monkeypatch.setenv("SDTRAINER_CACHE", builtin_cache)
    good = builtin.ensure_cached("tiny-sd1")
    monkeypatch.setenv("SDTRAINER_CACHE", str(cold_cache))
    planted = builtin.cache_dir("tiny-sd1")
    shutil.copytree(good, planted)
    (planted / "text_encoder" / "model.safetensors").unlink()
    assert builtin.missing_cache_files(planted) == ["text_encoder/model.safetensors"]

    with caplog.at_level(logging.WARNING, logger="trainer.models.builtin"):
        assert builtin.ensure_cached("tiny-sd1") == planted
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(planted) in warning and "text_encoder/model.safetensors" in warning
    assert builtin.missing_cache_files(planted) == []
    rebuilt, original = _weights(planted), _weights(good)
    assert rebuilt.keys() == original.keys()
    assert all(torch.equal(rebuilt[k], original[k]) for k in original)
    assert sorted(p.name for p in planted.parent.iterdir()) == [".tiny-sd1.lock", planted.name]


def test_an_entry_built_from_other_inputs_is_never_loaded_and_is_replaced(
    builtin_cache, cold_cache, monkeypatch, tmp_path
):
    """A cache filled by an older checkout (before the tiny VAE was retrained): the entry is
    complete, so only its inputs tell it apart."""
    monkeypatch.setenv("SDTRAINER_CACHE", builtin_cache)
    good = builtin.ensure_cached("tiny-sd1")
    monkeypatch.setenv("SDTRAINER_CACHE", str(cold_cache))
    stale = builtin.cache_dir("tiny-sd1")
    shutil.copytree(good, stale)
    changed = tmp_path / "vae.safetensors"  # the shipped VAE weights as a newer checkout has them
    changed.write_bytes(builtin.TINY_VAE_WEIGHTS.read_bytes() + b" ")
    monkeypatch.setattr(builtin, "TINY_VAE_WEIGHTS", changed)

    fresh = builtin.ensure_cached("tiny-sd1")
    assert fresh != stale and fresh.name.startswith("tiny-sd1-")
    assert builtin.missing_cache_files(fresh) == []
    assert not stale.exists()  # removed once its replacement was in place
    assert builtin.cache_dir("tiny-sd2") != builtin.cache_dir("tiny-sd1")


def test_a_sharded_entry_needs_every_shard(tmp_path):
    entry = tmp_path / "entry"
    for rel in builtin._ENTRY_FILES:
        (entry / rel).parent.mkdir(parents=True, exist_ok=True)
        (entry / rel).write_text("{}")
    for comp, fname in builtin._WEIGHTS.items():
        (entry / comp).mkdir(parents=True, exist_ok=True)
        (entry / comp / "config.json").write_text("{}")
        (entry / comp / fname).write_bytes(b"x")
    (entry / "text_encoder" / "model.safetensors").unlink()
    (entry / "text_encoder" / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}'
    )
    (entry / "text_encoder" / "model-00001-of-00002.safetensors").write_bytes(b"x")
    assert builtin.missing_cache_files(entry) == ["text_encoder/model-00002-of-00002.safetensors"]
    (entry / "text_encoder" / "model-00002-of-00002.safetensors").write_bytes(b"x")
    assert builtin.missing_cache_files(entry) == []
    (entry / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")  # empty = missing
    assert builtin.missing_cache_files(entry) == ["unet/diffusion_pytorch_model.safetensors"]


def test_a_rank_other_than_zero_builds_a_complete_entry(cold_cache, monkeypatch):
    """transformers writes no text-encoder weights on rank != 0 once torch.distributed is
    initialised; seen from that rank, a cold cache must still end up complete."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    folder = builtin.ensure_cached("tiny-sd1")
    assert builtin.missing_cache_files(folder) == []
