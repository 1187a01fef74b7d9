"""Single-file (original ldm layout) export, import and conversion (trainer.models)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import StableDiffusionPipeline  # noqa: E402

from trainer.models import convert_file, load_model, save_pipeline, save_single_file  # noqa: E402
from trainer.models.convert import main as convert_main  # noqa: E402
from trainer.runtime.errors import ModelLoadError  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """tiny-sd1 / tiny-sd2: components, their pipeline folder and an fp32 single file."""
    out = {}
    for name in ("tiny-sd1", "tiny-sd2"):
        root = tmp_path_factory.mktemp(name)
        c = load_model(f"builtin:{name}")
        save_pipeline(c, root / "pipe")
        written = save_single_file(c, root / "model.safetensors", half=False)
        out[name] = (c, root, written)
    return out


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    bad = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not bad, bad[:5]


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sd2"])
def test_diffusers_from_single_file_reloads_identical_weights(exported, name):
    c, root, _ = exported[name]
    pipe = StableDiffusionPipeline.from_single_file(
        str(root / "model.safetensors"), config=str(root / "pipe"), local_files_only=True
    )
    for part in ("unet", "vae", "text_encoder"):
        _same(getattr(c, part), getattr(pipe, part))


def test_sd1_layout_keys(exported):
    _, root, written = exported["tiny-sd1"]
    assert written == [root / "model.safetensors"]  # no yaml for SD1
    sd = load_file(str(root / "model.safetensors"))
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in sd
    assert "cond_stage_model.transformer.text_model.encoder.layers.5.self_attn.q_proj.weight" in sd
    for key in (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.input_blocks.1.1.proj_in.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",  # UpBlock2D upsampler
        "model.diffusion_model.output_blocks.5.2.conv.weight",  # CrossAttnUpBlock2D upsampler
        "model.diffusion_model.output_blocks.11.1.proj_out.weight",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
        "first_stage_model.post_quant_conv.weight",
    ):
        assert key in sd, key
    assert sd["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # ldm stores 1x1 convs
    assert all(k.split(".")[0] in ("model", "first_stage_model", "cond_stage_model") for k in sd)
    assert not any("down_blocks" in k or "resnets" in k for k in sd)
    position_ids = sd.pop("cond_stage_model.transformer.text_model.embeddings.position_ids")
    assert position_ids.dtype == torch.int64 and position_ids.tolist() == [list(range(77))]  # as in SD1.5
    assert all(v.dtype == torch.float32 for v in sd.values())


def test_sd2_layout_keys_and_yaml(exported):
    c, root, written = exported["tiny-sd2"]
    assert written == [root / "model.safetensors", root / "model.yaml"]
    sd = load_file(str(root / "model.safetensors"))
    width = c.text_encoder.config.hidden_size
    assert sd["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (
        3 * width,
        width,
    )
    assert (
        "cond_stage_model.model.ln_final.weight" in sd and "cond_stage_model.model.positional_embedding" in sd
    )
    assert not any(k.startswith("cond_stage_model.transformer") for k in sd)
    params = yaml.safe_load((root / "model.yaml").read_text())["model"]["params"]
    assert params["parameterization"] == "v"
    unet = params["unet_config"]["params"]
    assert unet["context_dim"] == c.unet.config.cross_attention_dim and unet["use_linear_in_transformer"]
    assert params["cond_stage_config"]["params"]["layer"] == "penultimate"


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sd2"])
def test_our_loader_round_trips_single_file(exported, name, tmp_path):
    c, root, _ = exported[name]
    loaded = load_model(str(root / "model.safetensors"))
    assert loaded.family == c.family and loaded.prediction_type == c.prediction_type
    assert loaded.tokenizer.model_max_length == 77
    for part in ("unet", "vae", "text_encoder"):
        _same(getattr(c, part), getattr(loaded, part))
    save_single_file(loaded, tmp_path / "again.safetensors", half=False)
    a, b = load_file(str(root / "model.safetensors")), load_file(str(tmp_path / "again.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_half_export_is_fp16_and_loads(exported, tmp_path):
    c, _, _ = exported["tiny-sd1"]
    path = tmp_path / "half.safetensors"
    save_single_file(c, path, half=True)
    assert {v.dtype for v in load_file(str(path)).values() if v.is_floating_point()} == {torch.float16}
    loaded = load_model(str(path))
    assert loaded.unet.conv_in.weight.dtype == torch.float32
    assert torch.equal(loaded.unet.conv_in.weight, c.unet.conv_in.weight.half().float())


def test_sd2_prediction_type_detection(exported, tmp_path, caplog):
    _, root, _ = exported["tiny-sd2"]
    bare = tmp_path / "bare.safetensors"  # no yaml and no metadata: like a downloaded file
    save_file(load_file(str(root / "model.safetensors")), str(bare))
    assert load_model(str(bare)).prediction_type == "v_prediction"
    assert "assuming v_prediction" in caplog.text
    assert load_model(str(bare), prediction_type="epsilon").prediction_type == "epsilon"
    (tmp_path / "bare.yaml").write_text(yaml.safe_dump({"model": {"params": {"linear_start": 0.00085}}}))
    assert load_model(str(bare)).prediction_type == "epsilon"  # v2-inference.yaml without `parameterization`


def test_ckpt_with_ema_and_extra_openclip_block_loads(exported, tmp_path):
    c, root, _ = exported["tiny-sd2"]
    sd = load_file(str(root / "model.safetensors"))
    n = c.text_encoder.config.num_hidden_layers
    # SD2 files carry one more OpenCLIP block than SD2 uses, plus EMA copies and training extras.
    for k in [k for k in sd if k.startswith("cond_stage_model.model.transformer.resblocks.0.")]:
        sd[k.replace("resblocks.0.", f"resblocks.{n}.")] = torch.randn_like(sd[k])
    for k in [k for k in sd if k.startswith("model.diffusion_model.")]:
        sd["model_ema." + k[len("model.diffusion_model.") :].replace(".", "")] = torch.zeros_like(sd[k])
    sd["cond_stage_model.model.text_projection"] = torch.randn(c.text_encoder.config.hidden_size, 24)
    sd["cond_stage_model.model.logit_scale"] = torch.tensor(1.0)
    sd["alphas_cumprod"] = torch.ones(1000)
    path = tmp_path / "full.ckpt"
    torch.save({"state_dict": sd, "global_step": 110000}, path)
    loaded = load_model(str(path))
    assert loaded.prediction_type == "epsilon"  # global_step 110000 is SD2 512-base
    for part in ("unet", "vae", "text_encoder"):
        _same(getattr(c, part), getattr(loaded, part))


class _Payload:
    """Unpickling this runs code that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_malicious_ckpt_is_refused_without_running_code(tmp_path):
    proof, marker = tmp_path / "proof", tmp_path / "marker"
    torch.save({"state_dict": {"x": _Payload(proof)}}, tmp_path / "proof.ckpt")
    torch.load(tmp_path / "proof.ckpt", weights_only=False)  # the payload really is live ...
    assert proof.exists()
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": _Payload(marker)}}, evil)
    with pytest.raises(ModelLoadError, match="unsafe unpickling") as e:
        load_model(str(evil))
    assert str(evil) in str(e.value)
    assert not marker.exists()  # ... and our loader never ran it


def test_bad_single_files_are_explained(exported, tmp_path):
    _, root, _ = exported["tiny-sd1"]
    sd = load_file(str(root / "model.safetensors"))
    cases = {
        "no Stable Diffusion UNet": {k: v for k, v in sd.items() if not k.startswith("model.")},
        "SDXL": {**sd, "conditioner.embedders.0.transformer.text_model.x": torch.zeros(1)},
        "unknown layout": {
            **sd,
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(
                49408, 40
            ),
        },
        "no VAE": {k: v for k, v in sd.items() if not k.startswith("first_stage_model.")},
        "missing": {k: v for k, v in sd.items() if "input_blocks.4.1.proj_out" not in k},
    }
    for expected, tensors in cases.items():
        path = tmp_path / f"{expected.replace(' ', '_')}.safetensors"
        save_file(tensors, str(path))
        with pytest.raises(ModelLoadError, match=expected) as e:
            load_model(str(path))
        assert str(path) in str(e.value)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ModelLoadError, match="not a readable"):
        load_model(str(broken))


def test_separate_vae_file_overrides(exported, tmp_path):
    c, root, _ = exported["tiny-sd1"]
    sd = load_file(str(root / "model.safetensors"))
    vae_only = {
        k.removeprefix("first_stage_model."): v + 1
        for k, v in sd.items()
        if k.startswith("first_stage_model.")
    }
    save_file(vae_only, str(tmp_path / "vae.safetensors"))  # like vae-ft-mse-840000: no prefix
    loaded = load_model("builtin:tiny-sd1", vae=str(tmp_path / "vae.safetensors"))
    assert torch.equal(loaded.vae.encoder.conv_in.weight, c.vae.encoder.conv_in.weight + 1)
    _same(loaded.unet, c.unet)
    assert "VAE from" in loaded.source
    with pytest.raises(ModelLoadError, match="VAE path"):
        load_model("builtin:tiny-sd1", vae=str(tmp_path / "missing.safetensors"))


def test_convert_cli_both_ways(exported, tmp_path):
    c, root, _ = exported["tiny-sd2"]
    folder = tmp_path / "from_file"
    assert convert_main([str(root / "model.safetensors"), str(folder)]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    _same(pipe.unet, c.unet)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    single = tmp_path / "back.safetensors"
    assert convert_main([str(folder), str(single), "--half"]) == 0
    assert single.with_suffix(".yaml").is_file()
    back = load_file(str(single))
    original = load_file(str(root / "model.safetensors"))
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k].half()) for k in back)
    with safe_open(str(single), "pt") as f:
        assert f.metadata()["sdtrainer.prediction_type"] == "v_prediction"
    assert convert_main([str(tmp_path / "nope.ckpt"), str(tmp_path / "x")]) == 2
    with pytest.raises(ModelLoadError, match="pickle"):
        convert_file(str(folder), str(tmp_path / "x.ckpt"), half=False)


@pytest.mark.slow
def test_sd15_arch_single_file_round_trip(tmp_path):
    """Full-size SD1.5 architecture: export, reload through the bundled configs, identical weights."""
    import hashlib

    def digests(c):
        return {
            f"{part}.{k}": hashlib.sha1(v.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for part in ("unet", "vae", "text_encoder")
            for k, v in getattr(c, part).state_dict().items()
        }

    c = load_model("builtin:sd15-arch")
    assert sum(p.numel() for p in c.unet.parameters()) > 800_000_000
    path = tmp_path / "sd15.safetensors"
    save_single_file(c, path, half=False)
    before = digests(c)
    del c
    loaded = load_model(str(path))
    assert loaded.family == "sd1" and "sd15 layout" in loaded.source
    assert digests(loaded) == before
