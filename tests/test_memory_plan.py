"""The memory plan (issue 31): its figures equal what a real step holds, and its check stops a
recipe that cannot fit before any weight loads.

The exactness tests plan a recipe on `builtin:tiny-sd1`, then build the same recipe with the
trainer's own `build_components` on CPU, run one real micro-step (the plan's batch: the largest
bucket, captions of the longest allowed length) and an optimizer step, and compare: weights,
gradients and optimizer states byte for byte with the tensors that exist, and the activations
with what autograd saved (and the live peak) in the real forward and backward.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from tests.helpers import ROOT
from trainer.config import load_config
from trainer.models.components import ComponentConfigs
from trainer.optim import apply_text_encoder_freeze, load_optimizer_file, plan_text_encoder_freeze
from trainer.optim.freezing import text_encoder_num_layers
from trainer.optim.registry import REGISTRY, build_optimizer, get_spec
from trainer.optim.resolve import TrainOptimSettings, resolve_components
from trainer.optim.schema import OptimizerFile, SectionConfig
from trainer.parts.builder import build_components
from trainer.parts.placement import WEIGHT_DTYPES
from trainer.plan import CATEGORIES, DoesNotFit, check_budget, fit_to_budget, plan_json, plan_memory
from trainer.plan.activations import planning_batch
from trainer.plan.architecture import architecture_of
from trainer.plan.fake_model import module_bytes, optim_settings, tensor_bytes
from trainer.plan.optimizer_state import UnmodelledOptimizer, parameter_state, shared_state
from trainer.plan.planner import largest_bucket
from trainer.plan.tracker import LiveBytes, SavedBytes

# The five recipes, on the tiny model. CPU autocast has no fp16 (the trainer refuses it
# there), so the 8-bit recipe's mixed precision is bf16 here; the fp16 case differs only in dtype.
RECIPES = {
    "adamw_fp32": ({"base": {"optimizer": "adamw", "lr": 1e-4}}, None, []),
    "adamw8bit_autocast": (
        {"base": {"optimizer": "adamw8bit", "lr": 1e-4}},
        None,
        ["--mixed_precision", "bf16"],
    ),
    "lowvram": (ROOT / "optimizer.json", ROOT / "examples/train/lowvram_sd15.json", []),
    "adafactor_bf16_fused": (
        ROOT / "examples/optimizers/adafactor_constant.json",
        None,
        ["--weight_dtype", "bf16", "--fused_back_pass", "true", "--mixed_precision", "bf16"],
    ),
    "prodigy": (ROOT / "examples/optimizers/prodigy.json", None, []),
    # stateless and in place: the fused back pass's peak has no estimated part
    "sgd_fused": ({"base": {"optimizer": "sgd", "lr": 1e-4}}, None, ["--fused_back_pass", "true"]),
}


def recipe_config(tmp_path: Path, name: str, resolution: int, batch_size: int = 2):
    optimizer, train_json, extra = RECIPES[name]
    if isinstance(optimizer, dict):
        path = tmp_path / "optimizer.json"
        path.write_text(json.dumps(optimizer))
        optimizer = path
    args = [
        "--resume_ckpt",
        "builtin:tiny-sd1",
        "--resolution",
        str(resolution),
        "--batch_size",
        str(batch_size),
    ]
    args += ["--optimizer_config", str(optimizer), "--logdir", str(tmp_path / "logs"), *extra]
    return load_config(str(train_json) if train_json else None, args)


@dataclass
class RealStep:
    weights: int
    frozen_weights: int
    gradients: int  # bytes of the gradients that exist after the backward
    trained_parameter_bytes: int
    optimizer_states: int
    saved_activations: int
    peak: int
    zero_parameters: list[torch.nn.Parameter]  # all-zero before the step (Prodigy keeps a scalar p0)


def real_step(cfg) -> RealStep:
    """One real CPU micro-step and optimizer step of `cfg`, built by the trainer, measured."""
    comps = build_components(cfg, Accelerator(cpu=True), total_optimizer_steps=10)
    model, trained = comps.model, comps.trained
    params = [p for c in comps.optim.components.values() for p in c.params]
    zero = [p for p in params if not p.detach().any()]
    every = [p for m in (model.unet, model.text_encoder, model.vae) for p in m.parameters()]
    saved, live = SavedBytes(exclude=every), LiveBytes()
    with live:
        batch = planning_batch(cfg, model.vae.config, largest_bucket(cfg.resolution), cfg.batch_size)
        with saved.recording():
            out = comps.step(batch)
        loss = out.loss.sum() / cfg.batch_size
        del out, batch
        comps.optim.backward(loss, comps.scaler)
        del loss
    gradients = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    comps.optim.step(comps.scaler)
    states = {}
    for optimizer in comps.optim.torch_optimizers():
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    states[id(value.untyped_storage())] = value.untyped_storage().nbytes()
    return RealStep(
        weights=sum(module_bytes(getattr(model, n)) for n in trained),
        frozen_weights=sum(
            module_bytes(getattr(model, n)) for n in ("unet", "text_encoder", "vae") if n not in trained
        ),
        gradients=gradients,
        trained_parameter_bytes=tensor_bytes(params),
        optimizer_states=sum(states.values()),
        saved_activations=saved.total,
        peak=live.peak.total,
        zero_parameters=zero,
    )


def prodigy_zero_p0_bytes(zero: list[torch.nn.Parameter]) -> int:
    """Prodigy keeps one scalar p0 for a parameter that is all zeros at its first step
    (prodigyopt/prodigy.py `if p.any()`); the plan assumes a trained model, whose are not."""
    return sum(4 * (p.numel() - 1) for p in zero)


CASES = [(name, 64) for name in RECIPES] + [
    pytest.param(name, 128, marks=pytest.mark.slow) for name in RECIPES if name != "adamw_fp32"
]


@pytest.mark.parametrize("name,resolution", [*CASES, ("adamw_fp32", 128)])
def test_planned_bytes_equal_a_real_cpu_step(tmp_path, name, resolution):
    cfg = recipe_config(tmp_path, name, resolution)
    plan = plan_memory(cfg, load_optimizer_file(cfg.optimizer_config), device="cpu")
    real = real_step(cfg)
    sizes = plan.sizes
    assert sizes.weights == real.weights
    assert sizes.frozen_weights == real.frozen_weights
    assert sizes.gradients == real.trained_parameter_bytes
    if not cfg.fused_back_pass:  # a normal step holds every gradient; the fused one frees each at once
        assert sizes.gradients == real.gradients
    else:
        assert real.gradients == 0
    expected_states = real.optimizer_states
    if name == "prodigy":
        expected_states += prodigy_zero_p0_bytes(real.zero_parameters)
    assert sizes.optimizer_states == expected_states
    assert sizes.saved_activations == real.saved_activations
    if name not in ("lowvram", "adafactor_bf16_fused"):  # their optimizer steps' temporaries are estimates
        assert sizes.step_peak == real.peak
    assert plan.categories["weights"] == real.weights
    assert plan.total_bytes == sum(plan.categories.values())


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_optimizer_state_layout_matches_what_the_library_allocates(name):
    """Every registered optimizer whose layout the plan models, stepped once on CPU on
    parameters of the shapes SD has (3x3 convolutions, linear layers, biases above and below
    bitsandbytes' 8-bit threshold): planned state bytes == the state tensors it made."""
    spec = REGISTRY[name]
    resolved = resolve_components(
        OptimizerFile(base=SectionConfig(optimizer=name, lr=1e-3)), TrainOptimSettings(), 10
    )
    options = resolved["unet"].options
    shapes = [(8, 4, 3, 3), (80, 64), (4100,), (8,), (30, 20, 3, 3)]
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    optimizer = build_optimizer(spec, params, resolved["unet"].lr, options)
    if spec.schedule_free:
        optimizer.train()
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    real = {
        id(v.untyped_storage()): v.untyped_storage().nbytes()
        for s in optimizer.state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor)
    }
    if name == "prodigy_schedulefree":
        with pytest.raises(UnmodelledOptimizer, match="no state layout"):
            parameter_state(spec, options, shapes[0])
        return
    planned = sum(t.nbytes for s in shapes for t in parameter_state(spec, options, s))
    planned += sum(t.nbytes for t in shared_state(spec, options, shapes))
    assert planned == sum(real.values())


def test_adafactor_factors_only_the_last_two_dimensions():
    """A 3x3 convolution keeps 2/3 of a full second moment under Adafactor (the issue's point:
    it is not the low-memory stand-in for SD that its factoring suggests)."""
    spec = REGISTRY["adafactor"]
    conv = sum(t.nbytes for t in parameter_state(spec, {}, (320, 320, 3, 3))) - 4  # minus the RMS scalar
    assert conv * 3 == 2 * 320 * 320 * 9 * 4
    linear = sum(t.nbytes for t in parameter_state(spec, {}, (320, 768))) - 4
    assert linear == (320 + 768) * 4


@pytest.mark.slow  # full-size architectures (no weights, but a real optimizer step per distinct shape)
@pytest.mark.parametrize("name,config", [("sd15-arch", "sd15"), ("sd21-arch", "sd21")])
@pytest.mark.parametrize(
    "recipe", ["adamw_fp32", "adamw8bit_autocast", "lowvram", "adafactor_bf16_fused", "prodigy"]
)
def test_full_size_weights_gradients_and_states_equal_the_built_objects(tmp_path, name, config, recipe):
    """sd15-arch / sd21-arch without a weight: the plan's weights and gradients equal those of
    the modules the bundled configs build on the meta device, frozen by the trainer's own
    freezing rules, and its optimizer states equal what the real optimizer allocates for one
    parameter of each distinct shape, times the number of parameters of that shape."""
    cfg = recipe_config(tmp_path, recipe, 512).model_copy(update={"resume_ckpt": f"builtin:{name}"})
    opt_file = load_optimizer_file(cfg.optimizer_config)
    plan = plan_memory(cfg, opt_file, device="cpu")
    with torch.device("meta"):
        unet, _, text_encoder = ComponentConfigs.bundled(config).instantiate()
    freeze = plan_text_encoder_freeze(opt_file.text_encoder_freezing, text_encoder_num_layers(text_encoder))
    apply_text_encoder_freeze(text_encoder, freeze)
    dtype = WEIGHT_DTYPES[cfg.weight_dtype]
    modules = {"unet": unet, "text_encoder": text_encoder}
    assert plan.sizes.weights == sum(
        sum(p.numel() for p in m.parameters()) * dtype.itemsize + sum(b.nbytes for b in m.buffers())
        for m in modules.values()
    )
    trained = {k: [p for p in m.parameters() if p.requires_grad] for k, m in modules.items()}
    assert plan.sizes.gradients == sum(p.numel() for ps in trained.values() for p in ps) * dtype.itemsize
    resolved = resolve_components(opt_file, optim_settings(cfg), 1)
    real = sum(_real_states_by_shape(resolved[k], ps, fused=cfg.fused_back_pass) for k, ps in trained.items())
    assert plan.sizes.optimizer_states == real


def _real_states_by_shape(resolved, params, *, fused: bool) -> int:
    """State bytes of `params` as the real optimizer allocates them, one shape at a time (ones,
    so Prodigy keeps a full p0 as for trained weights); bitsandbytes' maps once per optimizer
    (one per parameter under the fused back pass)."""
    spec = get_spec(resolved.optimizer)
    counts: dict[tuple[int, ...], int] = {}
    for p in params:
        counts[tuple(p.shape)] = counts.get(tuple(p.shape), 0) + 1
    total, maps = 0, 0
    for shape, count in counts.items():
        param = torch.nn.Parameter(torch.ones(shape))
        optimizer = build_optimizer(spec, [param], resolved.lr, resolved.options)
        param.grad = torch.ones_like(param)
        optimizer.step()
        tensors = {k: v for k, v in optimizer.state[param].items() if isinstance(v, torch.Tensor)}
        shape_maps = sum(v.nbytes for k, v in tensors.items() if k.startswith("qmap"))
        total += count * (
            sum(v.nbytes for k, v in tensors.items() if not k.startswith("qmap")) + fused * shape_maps
        )
        maps = max(maps, shape_maps)
    return total + (0 if fused else maps)


def small_recipe_args(tmp_path: Path) -> list[str]:
    """tiny-sd1 at 64 px, batch 1, latents cached, checkpointing on, fp32 AdamW, as command-line
    overrides: most advice is already taken or needs no new planning pass, so the advice tests
    stay quick."""
    path = tmp_path / "optimizer.json"
    path.write_text(json.dumps({"base": {"optimizer": "adamw", "lr": 1e-4}}))
    return [
        *("--resume_ckpt", "builtin:tiny-sd1", "--resolution", "64", "--batch_size", "1"),
        *("--cache_latents", "true", "--gradient_checkpointing", "true"),
        *("--optimizer_config", str(path), "--logdir", str(tmp_path / "logs")),
    ]


def small_recipe(tmp_path: Path, *extra: str):
    """The config of `small_recipe_args`, with `extra` overrides."""
    return load_config(None, [*small_recipe_args(tmp_path), *extra])


def test_a_budget_too_small_stops_with_the_table_and_advice_before_any_weight_loads(tmp_path, monkeypatch):
    cache = tmp_path / "model-cache"
    monkeypatch.setenv("SDTRAINER_CACHE", str(cache))  # a built-in model would be built and loaded here
    cfg = small_recipe(tmp_path)
    with pytest.raises(DoesNotFit) as info:
        check_budget(cfg, None, 2**20, device="cpu", budget_source="vram 0.001 GiB")
    message = str(info.value)
    assert "does not fit" in message and "vram 0.001 GiB" in message
    assert "optimizer states" in message and "activations" in message  # the table
    assert "optimizer.json base.optimizer: adamw8bit" in message  # the advice, with what it saves
    assert "saves" in message and "fused_back_pass: true" in message
    assert info.value.plan.advice and info.value.plan.advice_fits is False
    assert not cache.exists() or not any(cache.rglob("*.safetensors"))


def test_a_budget_that_fits_passes_and_auto_fit_applies_the_advice(tmp_path):
    cfg = small_recipe(tmp_path)
    opt_file = load_optimizer_file(cfg.optimizer_config)
    base = plan_memory(cfg, opt_file, device="cpu")
    assert check_budget(cfg, opt_file, base.total_bytes, device="cpu", budget_source="test").fits
    eight_bit = plan_memory(
        cfg, opt_file.model_copy(update={"base": SectionConfig(optimizer="adamw8bit", lr=1e-4)}), device="cpu"
    )
    assert eight_bit.total_bytes < base.total_bytes
    fitted_cfg, fitted_opt, fitted = fit_to_budget(
        cfg, opt_file, eight_bit.total_bytes, device="cpu", budget_source="test"
    )
    assert fitted.fits and fitted.total_bytes == eight_bit.total_bytes
    assert fitted_opt.base.optimizer == "adamw8bit" and fitted_cfg == cfg  # the cheapest change was enough


def test_plan_command_prints_one_json_object_with_categories_and_advice(tmp_path):
    args = small_recipe_args(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SDTRAINER_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "trainer.plan", "--config", str(ROOT / "train.json"), "--device", "cpu"]
    result = subprocess.run(
        [*cmd, *args, "--vram", "0.001", "--json"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 1, result.stderr[-2000:]
    plan = json.loads(result.stdout)
    assert set(CATEGORIES) <= set(plan["categories"]) and plan["fits"] is False
    assert (
        plan["total_bytes"] == sum(plan["categories"].values()) > plan["budget_bytes"] == int(0.001 * 2**30)
    )
    assert {"weights", "gradients", "optimizer_states", "activations"} <= {
        k for k, v in plan["categories"].items() if v
    }
    assert plan["advice"] and all(a["saves_bytes"] > 0 for a in plan["advice"])


def test_architecture_is_read_from_a_single_file_header_and_a_pipeline_folder(tmp_path):
    """A single file's shapes and a diffusers folder's config.json give the architecture the
    loader would build (same parameter count per component), without loading a tensor."""
    from trainer.models import load_model, save_single_file
    from trainer.models.builtin import ensure_cached

    single = tmp_path / "tiny.safetensors"
    save_single_file(load_model("builtin:tiny-sd1"), single)
    bundled = ComponentConfigs.bundled("tiny-sd1")
    for spec in (str(single), str(ensure_cached("tiny-sd1"))):
        arch, source = architecture_of(spec, logdir=str(tmp_path), project_name="p")
        assert spec in source
        with torch.device("meta"):
            built, expected = arch.instantiate(), bundled.instantiate()
        assert [sum(p.numel() for p in m.parameters()) for m in built] == [
            sum(p.numel() for p in m.parameters()) for m in expected
        ]


def test_cuda_emulation_runs_norms_in_fp32_under_autocast_only():
    """CUDA autocast runs group_norm / layer_norm in fp32 (CPU autocast leaves them in bf16): the
    planning pass's norm layers must give fp32 under autocast and stay untouched outside it."""
    from trainer.plan.emulation import use_cuda_autocast_norms

    layers = torch.nn.Sequential(torch.nn.GroupNorm(2, 4), torch.nn.Conv2d(4, 4, 1))
    text = torch.nn.LayerNorm(4)
    assert use_cuda_autocast_norms(layers, text) == 2
    x = torch.randn(1, 4, 3, 3, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layers[0](x).dtype == torch.float32 and text(x.permute(0, 2, 3, 1)).dtype == torch.float32
        assert layers(x).dtype == torch.bfloat16  # the convolution casts back down, as on CUDA
    assert layers[0](x.float()).dtype == torch.float32 and layers[0].weight.dtype == torch.float32


def _sample_file(tmp_path: Path, resolution: int) -> Path:
    path = tmp_path / f"samples{resolution}.json"
    path.write_text(
        json.dumps(
            {"batch_size": 2, "cfgs": [7.0], "resolution": resolution, "samples": [{"prompt": "a"}] * 2}
        )
    )
    return path


def test_sampling_is_a_transient_at_the_step_boundary_max_not_sum(tmp_path):
    """A larger sample resolution raises the sampling working memory and, once the sampling
    moment exceeds the training peak, the `sampling` category; the total is max(training
    peak, resident + sampling), never their sum (sampling happens with the gradients freed)."""
    cfg = small_recipe(tmp_path)
    opt_file = load_optimizer_file(cfg.optimizer_config)
    without = plan_memory(cfg.model_copy(update={"sample_prompts": None}), opt_file, device="cpu")
    assert without.categories["sampling"] == 0 and without.sizes.sampling == 0
    plans = {
        res: plan_memory(
            cfg.model_copy(update={"sample_prompts": str(_sample_file(tmp_path, res))}),
            opt_file,
            device="cpu",
        )
        for res in (64, 256)
    }
    assert plans[256].sizes.sampling > plans[64].sizes.sampling > 0
    assert plans[256].categories["sampling"] > plans[64].categories["sampling"]
    for plan in plans.values():
        c = plan.categories
        resident = c["weights"] + c["frozen_weights"] + c["optimizer_states"] + c["ema"] + c["ddp_buckets"]
        assert plan.total_bytes == max(without.total_bytes, resident + plan.sizes.sampling)
        assert plan.total_bytes == sum(c.values())


def test_remembered_meta_kernels_change_no_number_of_the_plan_or_its_advice(tmp_path, monkeypatch):
    """The planning passes remember each meta kernel's answer by operator and input signature
    (shadow.py); the advice re-plans every candidate with them. Every figure, the passes' own
    included, is the same as with each meta kernel computed every time."""
    from trainer.plan import Evaluator, shadow

    path = tmp_path / "optimizer.json"
    path.write_text(json.dumps({"base": {"optimizer": "adamw", "lr": 1e-4}}))
    cfg = load_config(
        None,
        ["--resume_ckpt", "builtin:tiny-sd1", "--resolution", "64", "--batch_size", "2"]
        + ["--cache_latents", "false", "--optimizer_config", str(path), "--logdir", str(tmp_path / "logs")],
    )
    opt_file = load_optimizer_file(cfg.optimizer_config)

    def planned():
        evaluator = Evaluator("cuda")
        plan = plan_memory(cfg, opt_file, device="cuda", budget_bytes=1, evaluator=evaluator)
        return plan_json(plan), dict(evaluator._passes)

    monkeypatch.setattr(shadow, "_LAYOUTS", {})
    with monkeypatch.context() as m:
        m.setattr(shadow, "_operator_cacheable", lambda func: False)
        uncached = planned()
    assert not shadow._LAYOUTS
    cached = planned()
    assert len(shadow._LAYOUTS) > 100
    plan, passes = cached
    assert len(plan["advice"]) + len(plan["not_offered"]) >= 4 and len(passes) >= 3  # re-plans
    assert cached == uncached


def test_data_parallel_gradients_are_the_buckets_not_a_second_copy(tmp_path):
    """The builder gives DDP `gradient_as_bucket_view=True`: each gradient is a view into the
    bucket DDP all-reduces, so with several processes every gradient is allocated (in its
    bucket) from the first backward on, and there is no copy beside them. A process then holds
    the gradients its step's peak does not already count, not a second copy of all of them (the
    plan used to add one)."""
    cfg = small_recipe(tmp_path)
    opt_file = load_optimizer_file(cfg.optimizer_config)
    one = plan_memory(cfg, opt_file, device="cpu")
    two = plan_memory(cfg, opt_file, device="cpu", processes=2)
    not_at_peak = one.sizes.gradients - one.categories["gradients"]
    assert 0 < not_at_peak < one.sizes.gradients
    assert two.categories["ddp_buckets"] == not_at_peak
    assert two.total_bytes - one.total_bytes == not_at_peak


def test_planning_logs_nothing_about_the_shadow_build(tmp_path, caplog):
    """The plan builds the recipe on shadow tensors; the builders' own start-up lines (attention,
    lean forwards, "EMA tracks ...") describe that build, not the run: a recipe without EMA was
    announced as tracking one. Only the run's build may say them."""
    cfg = small_recipe(tmp_path)
    assert not cfg.ema_enabled
    with caplog.at_level(logging.INFO):
        plan_memory(cfg, load_optimizer_file(cfg.optimizer_config), device="cpu")
    said = [r.getMessage() for r in caplog.records if r.name.startswith("trainer.parts")]
    assert said == []


def test_docs_table_generator_leaves_no_file_where_it_is_run(tmp_path, monkeypatch, capsys):
    """Its minimal optimizer.json files went into the current folder: a stray adamw.json in the
    repository root once got committed."""
    from trainer.plan import docs_table

    row = docs_table.Row("tiny", "train.json", ("--optimizer_config", "OPT:adamw"), "tiny-sd1, AdamW")
    monkeypatch.setattr(docs_table, "ROWS", (row,))
    monkeypatch.chdir(tmp_path)
    assert docs_table.main([]) == 0
    assert "| tiny-sd1, AdamW | tiny-sd1, 64x64 |" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
