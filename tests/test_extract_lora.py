"""LoRA extraction from a full fine-tune, with its fidelity measured (issue 33).

On the built-in tiny models: at full rank base + LoRA is the fine-tune (weights and UNet
prediction); kept energy and prediction error fall monotonically as the rank drops; conv layers
are written exactly when conv_rank > 0; the keys load, every one of them, in diffusers for SD1
and SD2 (text encoder included); the command refuses bad input before a model loads, and a
tuned model identical to the base writes nothing. The checks against ComfyUI's and kohya's own
loaders run outside the repository (docs/LORA.md).
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.helpers import adamw_file, checkpoint_dirs, copy_images, run_folders, tiny_unet, train_in_process
from trainer.export import command
from trainer.export.extract import (
    ArchitectureMismatchError,
    IdenticalModelsError,
    RankSettings,
    covered_targets,
    extract_lora,
)
from trainer.export.fidelity import build_report
from trainer.export.lora import decompose, factors, rank_for_energy, weight_delta
from trainer.export.naming import CONV, TEXT_ENCODER, UNET
from trainer.export.probe import Probe, lora_applied, predict, prediction_error
from trainer.export.write import write_checkpoint_lora
from trainer.models import load_model

FULL = 10_000  # more than any tiny layer's rank: every layer is clamped to its full rank
PROBE = Probe(latent_size=8)


@pytest.fixture(scope="module")
def sd1():
    return load_model("builtin:tiny-sd1")


@pytest.fixture(scope="module")
def sd2():
    return load_model("builtin:tiny-sd2")


def tuned_copy(base, *, scale=0.05, seed=0, components=(UNET, TEXT_ENCODER), covered_only=True, conv=True):
    """A stand-in fine-tune of `components`: every covered weight moved by a seeded change whose
    singular values decay geometrically (as a fine-tune's do), of `scale` times the weight's
    norm; with `covered_only=False`, every other parameter also gets seeded noise."""
    tuned = replace(base, unet=copy.deepcopy(base.unet), text_encoder=copy.deepcopy(base.text_encoder))
    keys = {(t.component, t.weight_key) for t in covered_targets(base, RankSettings(1, conv_rank=int(conv)))}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for component in components:
            for name, p in getattr(tuned, component).named_parameters():
                if (component, name) in keys:
                    out, n = p.shape[0], p[0].numel()
                    k = min(out, n)
                    a, b = torch.randn(out, k, generator=g), torch.randn(k, n, generator=g)
                    delta = ((a * 0.7 ** torch.arange(k)) @ b).reshape(p.shape)
                    p.add_(delta * (scale * p.norm() / delta.norm()))
                elif not covered_only:
                    p.add_(torch.randn(p.shape, generator=g) * scale * (p.std() if p.numel() > 1 else 1.0))
    return tuned


def merged(base, tensors, targets):
    """base with every LoRA layer added into its weights (what a loader's 'merge' does)."""
    out = replace(base, unet=copy.deepcopy(base.unet), text_encoder=copy.deepcopy(base.text_encoder))
    with torch.no_grad():
        for t in targets:
            w = dict(getattr(out, t.component).named_parameters())[t.weight_key]
            up, down = tensors[f"{t.lora_name}.lora_up.weight"], tensors[f"{t.lora_name}.lora_down.weight"]
            w += weight_delta(up, down, float(tensors[f"{t.lora_name}.alpha"]))
    return out


# --- the maths --------------------------------------------------------------------------------


def test_factors_at_full_rank_rebuild_linear_and_conv_changes():
    torch.manual_seed(0)
    for shape in [(12, 7), (6, 5, 3, 3), (8, 4, 1, 1)]:
        delta = torch.randn(shape)
        spectrum = decompose(delta)
        up, down = factors(spectrum, len(spectrum.s), shape)
        assert down.shape[1:] == shape[1:] and up.shape[0] == shape[0]
        torch.testing.assert_close(weight_delta(up, down, float(down.shape[0])), delta, atol=1e-5, rtol=1e-5)


def test_rank_for_energy_is_the_smallest_rank_reaching_the_target():
    s = torch.tensor([3.0, 2.0, 1.0, 0.5])  # energies 9, 4, 1, 0.25 of 14.25
    assert rank_for_energy(s, 9 / 14.25) == 1
    assert rank_for_energy(s, 9 / 14.25 + 1e-6) == 2
    assert rank_for_energy(s, 0.99) == 4
    assert rank_for_energy(s, 1.0) == 4
    assert rank_for_energy(torch.zeros(3), 0.5) == 0


# --- extraction on the tiny models -------------------------------------------------------------


def test_full_rank_reproduces_the_tuned_unet_and_text_encoder(sd1):
    tuned = tuned_copy(sd1)
    lora = extract_lora(sd1, tuned, RankSettings(FULL, conv_rank=FULL), progress=False)
    assert lora.components == [UNET, TEXT_ENCODER] and not lora.uncarried
    rebuilt = merged(sd1, lora.tensors, lora.targets())
    for component in (UNET, TEXT_ENCODER):
        want = getattr(tuned, component).state_dict()
        for key, value in getattr(rebuilt, component).state_dict().items():
            torch.testing.assert_close(value, want[key], atol=2e-6, rtol=1e-5, msg=f"{component} {key}")
    error = prediction_error(sd1, tuned, lora.tensors, lora.targets(), PROBE)
    assert error.base_rms > 1e-3  # the fine-tune does change the prediction
    assert error.relative < 1e-4, error


def test_kept_energy_and_prediction_error_fall_monotonically_as_the_rank_drops(sd1):
    tuned = tuned_copy(sd1, scale=0.1, seed=1)
    ranks = (FULL, 16, 8, 4, 2, 1)
    kept, errors, ladder = [], [], None
    for rank in ranks:
        lora = extract_lora(sd1, tuned, RankSettings(rank, conv_rank=rank), progress=False)
        kept.append(sum(r.kept for r in lora.layers) / sum(r.energy for r in lora.layers))
        errors.append(prediction_error(sd1, tuned, lora.tensors, lora.targets(), PROBE).relative)
        ladder = ladder or build_report(lora, None).kept_by_rank  # the full-rank run's "at rank r" line
    assert kept[0] == pytest.approx(1.0, abs=1e-9)
    assert all(a > b for a, b in zip(kept, kept[1:], strict=False)), kept
    assert errors[0] < 1e-4 and errors[-1] < 1.0
    assert all(a < b for a, b in zip(errors, errors[1:], strict=False)), errors
    # one run's ladder predicts what the runs at those ranks keep
    assert [ladder[r] for r in ranks[1:]] == pytest.approx(kept[1:], rel=1e-9)
    assert ladder[64] == pytest.approx(1.0)  # no tiny layer is wider than 64


def test_conv_layers_are_written_exactly_when_conv_rank_is_positive(sd1):
    tuned = tuned_copy(sd1, components=(UNET,))
    convs = [
        n for n, m in sd1.unet.named_modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
    ]
    carried = [n for n in convs if n not in ("conv_in", "conv_out")]  # kohya has no key for these two

    def conv_keys(tensors):
        return {k for k, v in tensors.items() if k.endswith("lora_down.weight") and v.shape[-1] == 3}

    without = extract_lora(sd1, tuned, RankSettings(4, conv_rank=0), progress=False)
    assert conv_keys(without.tensors) == set()
    assert not any("resnets" in k or "samplers" in k for k in without.tensors)
    with_conv = extract_lora(sd1, tuned, RankSettings(4, conv_rank=2), progress=False)
    assert conv_keys(with_conv.tensors) == {
        f"lora_unet_{n.replace('.', '_')}.lora_down.weight" for n in carried
    }
    assert {r.rank for r in with_conv.layers if r.target.kind == CONV} == {2}
    assert "lora_unet_down_blocks_0_resnets_0_time_emb_proj.lora_up.weight" in with_conv.tensors


def test_keys_are_kohyas_with_one_alpha_for_the_file(sd1):
    lora = extract_lora(sd1, tuned_copy(sd1), RankSettings(48), progress=False)
    t = lora.tensors
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert t[f"{stem}.lora_down.weight"].shape == (32, 32) and t[f"{stem}.lora_up.weight"].shape == (32, 32)
    assert t["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape == (
        32,
        32,
        1,
        1,
    )  # SD1: 1x1
    assert t["lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight"].shape == (48, 64, 1, 1)
    assert "lora_te_text_model_encoder_layers_5_mlp_fc2.lora_up.weight" in t
    assert "lora_te_text_model_encoder_layers_0_self_attn_out_proj.alpha" in t
    for key in t:
        assert key.startswith(("lora_unet_", "lora_te_")), key
        assert key.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")), key
    # ranks differ (32-wide layers are clamped), the alpha does not: diffusers needs one alpha
    assert {r.rank for r in lora.layers} == {32, 48}
    assert {float(v) for k, v in t.items() if k.endswith(".alpha")} == {48.0} == {lora.alpha}


def test_dynamic_rank_keeps_the_target_with_the_smallest_rank(sd1):
    tuned = tuned_copy(sd1, scale=0.1, seed=2)
    lora = extract_lora(sd1, tuned, RankSettings(64, conv_rank=64, keep=0.6), progress=False)
    ranks = {r.rank for r in lora.layers}
    assert len(ranks) > 1  # per layer, not one rank for all
    for r in lora.layers:
        s = decompose(
            dict(getattr(tuned, r.target.component).named_parameters())[r.target.weight_key].detach()
            - dict(getattr(sd1, r.target.component).named_parameters())[r.target.weight_key].detach()
        ).s
        assert r.kept / r.energy >= 0.6 - 1e-9 or r.rank == 64
        assert r.rank == 1 or float((s[: r.rank - 1] ** 2).sum()) / r.energy < 0.6


def test_text_encoder_only_when_it_was_trained_and_rounding_is_no_change(sd1):
    tuned = tuned_copy(sd1, components=(UNET,))
    with torch.no_grad():  # a frozen text encoder saved in fp16: the base rounded, not trained
        for p in tuned.text_encoder.parameters():
            p.copy_(p.half().float())
    lora = extract_lora(sd1, tuned, RankSettings(4), progress=False)
    assert lora.components == [UNET]
    assert not any(k.startswith("lora_te_") for k in lora.tensors)
    assert len(lora.unchanged) == sum(
        1 for t in covered_targets(sd1, RankSettings(4)) if t.component == TEXT_ENCODER
    )


def test_a_rank_larger_than_a_layer_is_clamped_with_a_note(sd1, caplog):
    with caplog.at_level(logging.WARNING, logger="trainer.export.extract"):
        lora = extract_lora(sd1, tuned_copy(sd1), RankSettings(48), progress=False)
    small = [r for r in lora.layers if r.limit < 48]
    assert small and all(r.rank == r.limit and r.clamped for r in small)
    assert any(r.rank == 48 for r in lora.layers)
    assert "smaller than the rank asked for" in caplog.text and small[0].target.lora_name in caplog.text


def test_changes_no_key_can_carry_are_reported(sd1):
    tuned = tuned_copy(sd1, covered_only=False, components=(UNET,))
    lora = extract_lora(sd1, tuned, RankSettings(4), progress=False)
    assert (
        "unet.conv_in.weight" in lora.uncarried
        and "unet.down_blocks.0.resnets.0.conv1.weight" in lora.uncarried
    )
    assert all(v > 0 for v in lora.uncarried.values())
    report = build_report(lora, None)
    total = sum(r.energy for r in lora.layers) + sum(lora.uncarried.values())
    assert report.uncarried_fraction == pytest.approx(sum(lora.uncarried.values()) / total)
    largest = max(lora.uncarried, key=lora.uncarried.get)
    assert report.largest_uncarried[0] == (largest, pytest.approx(lora.uncarried[largest] / total))
    assert f"largest changes not carried: {largest}" in report.format()


def test_architecture_mismatch_names_the_first_key_and_both_shapes(sd1, sd2):
    with pytest.raises(ArchitectureMismatchError, match="SD1.*SD2"):
        extract_lora(sd1, sd2, RankSettings(4), progress=False)
    other = replace(sd1, unet=tiny_unet(cross_attention_dim=32))
    with pytest.raises(ArchitectureMismatchError, match=r"unet key '[\w.]+' is \(.*\) in the base .* and"):
        extract_lora(sd1, other, RankSettings(4), progress=False)


def test_identical_models_extract_nothing(sd1):
    same = replace(sd1, unet=copy.deepcopy(sd1.unet), text_encoder=copy.deepcopy(sd1.text_encoder))
    with pytest.raises(IdenticalModelsError, match="same weights as the base"):
        extract_lora(sd1, same, RankSettings(4), progress=False)


# --- the file in diffusers ---------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_diffusers_loads_every_key_and_applies_it(family, sd1, sd2, tmp_path):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    base = sd1 if family == "sd1" else sd2
    tuned = tuned_copy(base, seed=3)
    out = tmp_path / "lora.safetensors"
    outcome = write_checkpoint_lora(base, tuned, out, FULL, conv_rank=FULL, precision="fp32", measure=False)
    stored = load_file(out)
    names = {k.split(".")[0] for k in stored}
    assert any(n.startswith("lora_te_") for n in names) and outcome.keys == len(stored)

    model = replace(base, unet=copy.deepcopy(base.unet), text_encoder=copy.deepcopy(base.text_encoder))
    pipe = StableDiffusionPipeline(
        vae=model.vae,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        unet=model.unet,
        scheduler=DDPMScheduler.from_config(model.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    converted, alphas = pipe.lora_state_dict(str(out))  # diffusers' kohya converter: raises on leftovers
    assert len(alphas) == len(names)
    pipe.load_lora_weights(str(out))
    injected = [
        (c, n)
        for c in (UNET, TEXT_ENCODER)
        for n, m in getattr(model, c).named_modules()
        if hasattr(m, "lora_A")
    ]
    assert len(injected) == len(names)  # one adapted module per LoRA layer in the file, no more
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    for component in (UNET, TEXT_ENCODER):  # every layer applied with its alpha: base + LoRA = tuned
        want = getattr(tuned, component).state_dict()
        for key, value in getattr(model, component).state_dict().items():
            torch.testing.assert_close(
                value, want[key], atol=5e-6, rtol=1e-5, msg=f"{family} {component} {key}"
            )


# --- the command and the checkpoint writer ----------------------------------------------------


def run_command(*args) -> int:
    return command.main([str(a) for a in args])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--out", "x.pt"], "--out x.pt: the LoRA is written as .safetensors"),
        (["--rank", "0"], "--rank 0: a LoRA needs rank 1 or more"),
        (["--conv_rank", "-1"], "--conv_rank -1"),
        (["--keep", "1.5"], "--keep 1.5"),
        (["--tuned", "no/such/folder"], "--tuned 'no/such/folder' does not exist"),
    ],
)
def test_bad_input_is_refused_before_a_model_loads(args, message, tmp_path, caplog, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(command, "load_source", no_load)
    flags = {
        "--base": "builtin:tiny-sd1",
        "--tuned": "builtin:tiny-sd1",
        "--out": str(tmp_path / "l.safetensors"),
    }
    flags.update(zip(args[::2], args[1::2], strict=True))
    with caplog.at_level(logging.ERROR):
        assert run_command(*[x for pair in flags.items() for x in pair]) == 2
    assert message in caplog.text


def test_an_existing_output_is_kept_unless_overwrite(tmp_path, caplog):
    out = tmp_path / "l.safetensors"
    out.write_bytes(b"mine")
    with caplog.at_level(logging.ERROR):
        assert run_command("--base", "builtin:tiny-sd1", "--tuned", "builtin:tiny-sd1", "--out", out) == 2
    assert "exists; choose another name or add --overwrite" in caplog.text and out.read_bytes() == b"mine"


def test_a_tuned_model_identical_to_the_base_writes_nothing(tmp_path, caplog):
    out = tmp_path / "l.safetensors"
    with caplog.at_level(logging.ERROR):
        assert run_command("--base", "builtin:tiny-sd1", "--tuned", "builtin:tiny-sd1", "--out", out) == 2
    assert "same weights as the base" in caplog.text and "nothing was written" in caplog.text
    assert list(tmp_path.iterdir()) == []


def test_the_command_extracts_a_trained_checkpoint(tmp_path, capsys):
    train_in_process(
        tmp_path,
        data_root=copy_images(tmp_path / "data", 4),
        resolution=64,
        batch_size=2,
        optimizer_config=adamw_file(tmp_path, lr=1e-3),
        cache_latents=False,
        save_optimizer=False,
    )
    checkpoint = checkpoint_dirs(run_folders(tmp_path / "logs")[0])[-1]
    step = json.loads((checkpoint / "manifest.json").read_text())["global_step"]
    out = tmp_path / "lora" / "shapes.safetensors"
    code = run_command(
        "--base",
        "builtin:tiny-sd1",
        "--tuned",
        checkpoint,
        "--out",
        out,
        "--rank",
        4,
        "--save_precision",
        "bf16",
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "LoRA fidelity (rank 4, conv 0; unet, text_encoder)" in printed
    assert "UNet prediction error, base + LoRA vs the fine-tune: 0." in printed
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    assert {d for k, d in dtypes.items() if not k.endswith(".alpha")} == {torch.bfloat16}
    assert {d for k, d in dtypes.items() if k.endswith(".alpha")} == {torch.float32}
    assert meta["sdtrainer.source_step"] == str(step) and meta["ss_network_dim"] == "4"
    assert meta["ss_v2"] == "False" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["sdtrainer.base"] == "builtin:tiny-sd1" and len(meta["sdtrainer.base_weights_sha256"]) == 64
    report = json.loads((tmp_path / "lora" / "shapes.fidelity.json").read_text())
    assert meta["sdtrainer.kept_fraction"] == f"{report['kept_fraction']:.6f}"
    assert 0 < report["prediction"]["relative"] < 1
    assert (tmp_path / "lora" / "shapes.fidelity.txt").read_text().startswith("LoRA fidelity")
    # the checkpoint's single file: the same step, read from the manifest beside it
    single = next(checkpoint.glob("*.safetensors"))
    assert (
        run_command(
            "--base", "builtin:tiny-sd1", "--tuned", single, "--out", tmp_path / "s.safetensors", "--no_probe"
        )
        == 0
    )
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        assert f.metadata()["sdtrainer.source_step"] == str(step)


def test_an_incomplete_checkpoint_is_refused_before_a_model_loads(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(command, "load_source", lambda *a: pytest.fail("a model was loaded"))
    broken = tmp_path / "shapes-ep001-gs000002"
    (broken / "pipeline").mkdir(parents=True)  # a save interrupted before its manifest
    with caplog.at_level(logging.ERROR):
        assert (
            run_command("--base", "builtin:tiny-sd1", "--tuned", broken, "--out", tmp_path / "l.safetensors")
            == 2
        )
    assert "is not a complete checkpoint (no manifest.json)" in caplog.text


def test_write_checkpoint_lora_writes_a_locon_file_and_its_report_beside_it(sd1, tmp_path):
    out = tmp_path / "shapes-ep001-gs000010" / "shapes-ep001-gs000010-lora.safetensors"
    outcome = write_checkpoint_lora(sd1, tuned_copy(sd1), out, 4, step=10, base_name="builtin:tiny-sd1")
    stored = load_file(out)
    assert outcome.path == out and outcome.keys == len(stored)
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in stored  # conv_rank defaults to rank
    assert {t.dtype for k, t in stored.items() if not k.endswith(".alpha")} == {torch.float16}
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["sdtrainer.source_step"] == "10" and meta["sdtrainer.tuned"] == "shapes-ep001-gs000010-lora"
    assert meta["ss_network_args"] == json.dumps({"conv_dim": "4", "conv_alpha": "4.0"})
    report = json.loads(out.with_suffix(".fidelity.json").read_text())
    assert report["kept_fraction"] == pytest.approx(outcome.report.kept_fraction)
    assert 0 < report["prediction"]["relative"] < 1


def test_write_checkpoint_lora_skips_an_untrained_checkpoint_with_a_warning(sd1, tmp_path, caplog):
    same = replace(sd1, unet=copy.deepcopy(sd1.unet), text_encoder=copy.deepcopy(sd1.text_encoder))
    with caplog.at_level(logging.WARNING):
        assert write_checkpoint_lora(sd1, same, tmp_path / "ck" / "l.safetensors", 8, step=0) is None
    assert "no LoRA written beside checkpoint" in caplog.text
    assert not (tmp_path / "ck" / "l.safetensors").exists()


def test_the_probe_leaves_the_base_as_it_was(sd1):
    lora = extract_lora(sd1, tuned_copy(sd1), RankSettings(2), progress=False)
    before = predict(sd1, PROBE, 8)
    with lora_applied(sd1, lora.tensors, lora.targets()):
        assert not torch.equal(predict(sd1, PROBE, 8), before)
    assert torch.equal(predict(sd1, PROBE, 8), before)
