"""What the export writes survives every way a model travels (issue 29, item 7).

An SD2 single file's OpenCLIP parts that SD2 does not use (the last block, `text_projection`,
`logit_scale`) are kept by a direct import and export; they must also survive the checkpoint's
`pipeline/` folder, which every resume (exact or weights only) loads. Weight files get the
user's umask, and every v-prediction single file gets the `.yaml` A1111 reads beside it.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.helpers import checkpoint_dirs, copy_images, train_in_process
from trainer.checkpointing import EXACT, WEIGHTS
from trainer.models import load_model, save_pipeline, save_single_file
from trainer.models.builtin import ensure_cached
from trainer.models.builtin import main as builtin_main
from trainer.models.convert import main as convert_main
from trainer.runtime.errors import ModelLoadError

OPEN_CLIP = "cond_stage_model.model."
EXTRAS_FILE = Path("text_encoder") / "openclip_extras.safetensors"

# 8 images at batch 4: 2 optimizer steps per epoch; 64 px and plain AdamW keep each run ~2 s.
RUN = dict(resolution=64, batch_size=4, max_epochs=1, lr=None, cond_dropout=0.0, save_full_precision=True)


def _opt_file(tmp_path: Path) -> str:
    path = tmp_path / "opt.json"
    spec = {"optimizer": "adamw", "lr": 1e-4, "lr_scheduler": "constant", "lr_warmup_steps": 0}
    path.write_text(json.dumps({"base": spec, "text_encoder_overrides": None}))
    return str(path)


def _train(tmp_path: Path, **overrides):
    data = tmp_path / "data"
    if not data.exists():
        copy_images(data, 8)
    values = {**RUN, "data_root": str(data), "optimizer_config": _opt_file(tmp_path), **overrides}
    return train_in_process(tmp_path, **values)


def _single_file(checkpoint: Path) -> dict[str, torch.Tensor]:
    [path] = [p for p in checkpoint.glob("*.safetensors") if not p.stem.endswith("-ema")]
    return load_file(str(path))


def _extras_of(tensors: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    tail = (
        f"{OPEN_CLIP}transformer.resblocks.{layers}.",
        OPEN_CLIP + "text_projection",
        OPEN_CLIP + "logit_scale",
    )
    return {k: v for k, v in tensors.items() if k.startswith(tail)}


@pytest.fixture(scope="module")
def sd2_source(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor], int]:
    """builtin:tiny-sd2 as a single file whose unused OpenCLIP parts are not what an export would
    make up (a copy of the last used block, the identity, ln 100): as a real SD2.1 file's."""
    root = tmp_path_factory.mktemp("sd2src")
    c = load_model("builtin:tiny-sd2")
    n = c.text_encoder.config.num_hidden_layers
    save_single_file(c, root / "made.safetensors", half=False)
    tensors = load_file(str(root / "made.safetensors"))
    with safe_open(str(root / "made.safetensors"), "pt") as f:
        metadata = f.metadata()
    g = torch.Generator().manual_seed(7)
    real = {k: torch.randn(v.shape, generator=g) for k, v in _extras_of(tensors, n).items()}
    real[OPEN_CLIP + "logit_scale"] = torch.tensor(4.6052)
    assert len(real) == 14  # the block's 12 tensors, the projection and the scale
    path = root / "source.safetensors"
    save_file({**tensors, **real}, str(path), metadata=metadata)
    return path, real, n


def test_sd2_extras_survive_an_exact_resume_bitwise(sd2_source, tmp_path):
    source, real, n = sd2_source
    straight, s_session = _train(tmp_path, project_name="straight", resume_ckpt=str(source))
    assert straight.global_step == 2
    first, _ = _train(tmp_path, project_name="resumed", resume_ckpt=str(source), stop_at_step=1)
    assert first.global_step == 1
    second, r_session = _train(tmp_path, project_name="resumed", resume_ckpt="findlast")
    assert r_session.plan.mode == EXACT and second.global_step == 2

    a = _single_file(checkpoint_dirs(s_session.run.path)[-1])
    b = _single_file(checkpoint_dirs(r_session.run.path)[-1])
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    exported = _extras_of(b, n)
    assert exported.keys() == real.keys()
    assert all(torch.equal(exported[k], v) for k, v in real.items())  # as imported, not made up


def test_sd2_extras_survive_a_weights_only_chain(sd2_source, tmp_path):
    source, real, n = sd2_source
    _train(tmp_path, project_name="chain", resume_ckpt=str(source), stop_at_step=1)
    summary, session = _train(tmp_path, project_name="chain", resume_ckpt="findlast", batch_size=2)
    assert session.plan.mode == WEIGHTS and summary.global_step == 4
    exported = _extras_of(_single_file(checkpoint_dirs(session.run.path)[-1]), n)
    assert exported.keys() == real.keys()
    assert all(torch.equal(exported[k], v) for k, v in real.items())


def test_the_pipeline_folder_keeps_the_extras_where_diffusers_does_not_look(sd2_source, tmp_path):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    source, real, _ = sd2_source
    imported = load_model(str(source))
    save_pipeline(imported, tmp_path / "pipe")
    assert (tmp_path / "pipe" / EXTRAS_FILE).is_file()
    reloaded = load_model(str(tmp_path / "pipe"))
    assert reloaded.text_encoder_extras.keys() == real.keys()
    assert all(torch.equal(reloaded.text_encoder_extras[k], v) for k, v in real.items())
    # diffusers and transformers load the folder as before and never read the extras file.
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "pipe"), local_files_only=True)
    alone = CLIPTextModel.from_pretrained(str(tmp_path / "pipe"), subfolder="text_encoder")
    for te in (pipe.text_encoder, alone):
        sa, sb = te.state_dict(), imported.text_encoder.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # A model without extras (a built-in) writes no extras file, and loads without extras.
    save_pipeline(load_model("builtin:tiny-sd2"), tmp_path / "plain")
    assert not (tmp_path / "plain" / EXTRAS_FILE).exists()
    assert load_model(str(tmp_path / "plain")).text_encoder_extras == {}


def test_an_extras_file_that_does_not_fit_the_model_is_refused(sd2_source, tmp_path):
    source, real, n = sd2_source
    save_pipeline(load_model(str(source)), tmp_path / "pipe")
    path = tmp_path / "pipe" / EXTRAS_FILE
    key = f"{OPEN_CLIP}transformer.resblocks.{n}.ln_1.weight"
    save_file({**real, key: torch.zeros(3)}, str(path))
    with pytest.raises(ModelLoadError, match=rf"{EXTRAS_FILE.name}.*{key}.*\[3\]"):
        load_model(str(tmp_path / "pipe"))
    save_file({**real, OPEN_CLIP + "unknown": torch.zeros(1)}, str(path))
    with pytest.raises(ModelLoadError, match=rf"{EXTRAS_FILE.name}.*{OPEN_CLIP}unknown"):
        load_model(str(tmp_path / "pipe"))


# --- permissions: every writer applies the umask, as checkpoints do ---------------------------


@contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _modes(root: Path) -> dict[str, str]:
    """Every file and folder under `root` (and `root`) that does not have the umask-022 mode."""
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    wrong = {}
    for p in paths:
        want = 0o755 if p.is_dir() else 0o644
        if stat.S_IMODE(p.stat().st_mode) != want:
            wrong[str(p.relative_to(root.parent))] = oct(stat.S_IMODE(p.stat().st_mode))
    return wrong


def test_written_models_get_the_umask(tmp_path, monkeypatch):
    with _umask(0o022):
        written = save_single_file(load_model("builtin:tiny-sd2"), tmp_path / "direct.safetensors")
        assert convert_main(["builtin:tiny-sd1", str(tmp_path / "conv.safetensors")]) == 0
        assert convert_main([str(tmp_path / "conv.safetensors"), str(tmp_path / "conv_folder")]) == 0
        assert builtin_main(["tiny-sd1", str(tmp_path / "builtin_folder")]) == 0
        monkeypatch.setenv("SDTRAINER_CACHE", str(tmp_path / "cache"))
        entry = ensure_cached("tiny-sd1")
    assert len(written) == 2  # the file and its yaml
    wrong = {}
    for p in [*written, tmp_path / "conv.safetensors", tmp_path / "conv_folder", tmp_path / "builtin_folder"]:
        wrong |= _modes(p)
    wrong |= _modes(entry)
    assert not wrong, wrong


# --- the .yaml A1111 reads beside a v-prediction single file ---------------------------------


def _params(path: Path) -> dict:
    return yaml.safe_load(path.read_text())["model"]["params"]


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sd2"])
def test_v_prediction_single_files_get_the_a1111_yaml(name, tmp_path):
    c = load_model(f"builtin:{name}", prediction_type="v_prediction")
    written = save_single_file(c, tmp_path / "m.safetensors", half=False)
    assert written == [tmp_path / "m.safetensors", tmp_path / "m.yaml"]
    params = _params(tmp_path / "m.yaml")
    assert params["parameterization"] == "v" and params["use_ema"] is False
    unet = params["unet_config"]["params"]
    assert unet["model_channels"] == c.unet.config.block_out_channels[0]
    assert unet["context_dim"] == c.unet.config.cross_attention_dim
    embedder = params["cond_stage_config"]["target"].rsplit(".", 1)[1]
    assert embedder == {"tiny-sd1": "FrozenCLIPEmbedder", "tiny-sd2": "FrozenOpenCLIPEmbedder"}[name]
    if name == "tiny-sd1":  # SD1: heads by count (v1-inference.yaml), no linear projection
        assert (
            unet["num_heads"] == c.unet.config.attention_head_dim and "use_linear_in_transformer" not in unet
        )
    assert load_model(str(tmp_path / "m.safetensors")).prediction_type == "v_prediction"


def test_an_sd1_epsilon_single_file_gets_no_yaml(tmp_path, caplog):
    c = load_model("builtin:tiny-sd1")
    assert save_single_file(c, tmp_path / "m.safetensors") == [tmp_path / "m.safetensors"]
    assert not (tmp_path / "m.yaml").exists()
    # A yaml left beside the name by an earlier v-prediction export would make A1111 (and our
    # loader) read the new epsilon file as v: it is removed, loudly.
    save_single_file(
        load_model("builtin:tiny-sd1", prediction_type="v_prediction"), tmp_path / "m.safetensors"
    )
    assert (tmp_path / "m.yaml").is_file()
    with caplog.at_level(logging.WARNING):
        save_single_file(c, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.yaml").exists() and "m.yaml" in caplog.text
    assert load_model(str(tmp_path / "m.safetensors")).prediction_type == "epsilon"


def test_an_sd2_epsilon_single_file_gets_a_yaml_without_parameterization(tmp_path):
    """A1111 has no SD2 default: without a yaml it guesses v or epsilon from a test forward pass
    of the UNet (`is_using_v_parameterization_for_sd2`); v2-inference.yaml settles it."""
    c = load_model("builtin:tiny-sd2", prediction_type="epsilon")
    written = save_single_file(c, tmp_path / "m.safetensors")
    assert written == [tmp_path / "m.safetensors", tmp_path / "m.yaml"]
    assert "parameterization" not in _params(tmp_path / "m.yaml")


def test_checkpoint_and_convert_exports_of_a_v_model_carry_the_yaml(tmp_path):
    summary, session = _train(tmp_path, project_name="v1", prediction_type="v_prediction", no_save_ckpt=False)
    ckpt = checkpoint_dirs(session.run.path)[-1]
    [single] = list(ckpt.glob("*.safetensors"))
    assert _params(single.with_suffix(".yaml"))["parameterization"] == "v"
    out = tmp_path / "converted.safetensors"
    assert convert_main([str(ckpt / "pipeline"), str(out)]) == 0
    assert _params(out.with_suffix(".yaml"))["parameterization"] == "v"
    eps = tmp_path / "eps.safetensors"
    assert convert_main(["builtin:tiny-sd1", str(eps)]) == 0
    assert not eps.with_suffix(".yaml").exists()
