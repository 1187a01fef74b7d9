"""All-pairs matrix over the settings that interact, each case trained, resumed and exported.

Components are tested alone elsewhere; defects hide where they meet (issue 13: EMA with a frozen
text encoder crashed on save). Every pair of values of the factors below appears in at least one
case; `all_pairs` builds the cases deterministically and skips the pairs the config refuses
(`INVALID`), and `test_refused_combinations_say_why` checks each of those is refused with a
clear error. A case trains 2 epochs of 2 optimizer steps with a checkpoint after epoch 1,
resumes from that checkpoint (bitwise equal weights, EMA included, to the straight run), and
reloads the exported diffusers folder with diffusers itself.
"""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    DATA,
    ROOT,
    assert_bitwise_equal,
    base_args,
    checkpoint_dirs,
    pipeline_weights,
    train_in_process,
)

FACTORS: dict[str, list] = {
    "text_encoder": ["trained", "partly_frozen", "frozen", "cached"],
    "ema": ["off", "cpu", "device"],
    "model": ["sd1", "sd2_ztsnr_v"],
    "grad_accum": [1, 2],
    "fused_back_pass": [False, True],
    "weight_dtype": ["fp32", "bf16"],
    "latent_cache": [False, True],
    "min_snr": [False, True],
    "validation": [False, True],
    "samples": [False, True],
    "optimizer": ["adamw", "adamw8bit"],
}

# Combinations the config refuses: (the values that together are refused, the error it gives).
INVALID: list[tuple[dict, str]] = [
    ({"fused_back_pass": True, "grad_accum": 2}, "fused_back_pass needs grad_accum 1"),
]


def _refused_by(case: dict, rules: list[tuple[dict, str]]) -> str | None:
    """The error of the first rule whose values all appear in `case` (a full or partial case)."""
    for values, message in rules:
        if all(case.get(k, object()) == v for k, v in values.items()):
            return message
    return None


def all_pairs(factors: dict[str, list], allowed: Callable[[dict], bool]) -> list[dict]:
    """A small set of cases covering every allowed pair of values of two factors (greedy).

    Each new case starts from the first still-uncovered pair, then fills the other factors in
    order with the value that covers the most uncovered pairs with the factors already set
    (ties: the first value), among the values `allowed` accepts for the partial case. Pure and
    deterministic: the same factors give the same cases.
    """
    names = list(factors)

    def pairs_of(case: dict) -> set:
        keys = [n for n in names if n in case]
        return {((a, case[a]), (b, case[b])) for a, b in itertools.combinations(keys, 2)}

    uncovered = {
        ((a, va), (b, vb))
        for a, b in itertools.combinations(names, 2)
        for va in factors[a]
        for vb in factors[b]
        if allowed({a: va, b: vb})
    }
    cases = []
    while uncovered:
        (a, va), (b, vb) = min(uncovered, key=lambda p: (names.index(p[0][0]), names.index(p[1][0]), repr(p)))
        case = {a: va, b: vb}
        for name in names:
            if name in case:
                continue
            candidates = [v for v in factors[name] if allowed({**case, name: v})]
            if not candidates:
                raise ValueError(f"no allowed value of {name!r} completes {case}")
            case[name] = max(candidates, key=lambda v: len(pairs_of({**case, name: v}) & uncovered))
        case = {n: case[n] for n in names}
        uncovered -= pairs_of(case)
        cases.append(case)
    return cases


def _allowed(case: dict) -> bool:
    return _refused_by(case, INVALID) is None


CASES = all_pairs(FACTORS, _allowed)


def case_id(case: dict) -> str:
    return "-".join(f"{k[:3]}={('y' if v else 'n') if isinstance(v, bool) else v}" for k, v in case.items())


def test_all_pairs_covers_every_allowed_pair_and_no_refused_case():
    for a, b in itertools.combinations(FACTORS, 2):
        for va, vb in itertools.product(FACTORS[a], FACTORS[b]):
            covered = any(c[a] == va and c[b] == vb for c in CASES)
            assert covered == _allowed({a: va, b: vb}), (a, va, b, vb)
    assert all(_allowed(c) for c in CASES)
    assert all_pairs(FACTORS, _allowed) == CASES  # deterministic
    # A full factorial would be 4*3*2**9 = 6144 runs; all pairs needs about 4*3.
    assert 12 <= len(CASES) <= 16
    tiny = all_pairs({"x": [1, 2], "y": ["a", "b"], "z": [True, False]}, lambda c: True)
    assert len(tiny) == 4 and len({(c["x"], c["y"]) for c in tiny}) == 4


# ---- turning a case into train.json / optimizer.json overrides ------------------------------------


def _files(root: Path) -> dict[str, str]:
    """Data, validation set and sample prompts shared by all cases (one logdir: one latent cache)."""
    root.mkdir(parents=True, exist_ok=True)
    images = sorted(DATA.glob("*.png"))
    for folder, chosen in (("train", images[:4]), ("val", images[4:6])):
        (root / folder).mkdir(exist_ok=True)
        for image in chosen:
            for src in (image, image.with_suffix(".txt")):
                shutil.copy(src, root / folder / src.name)
    (root / "validation.json").write_text(
        json.dumps(
            {
                "validate_training": True,
                "val_split_mode": "manual",
                "manual_data_root": str(root / "val"),
                "stabilize_training_loss": False,
                "every_n_epochs": 1,
            }
        )
    )
    (root / "prompts.json").write_text(
        json.dumps(
            {
                "num_inference_steps": 1,
                "generate_pretrain_samples": False,
                "samples": [{"prompt": "a red circle"}],
            }
        )
    )
    return {
        "data": str(root / "train"),
        "val": str(root / "validation.json"),
        "prompts": str(root / "prompts.json"),
    }


def overrides(case: dict, files: dict[str, str], logdir: Path, name: str) -> dict:
    opt: dict = {"base": {"optimizer": case["optimizer"], "lr": 2e-4}}
    if case["text_encoder"] == "partly_frozen":
        opt["text_encoder_freezing"] = {"unfreeze_last_n_layers": 1}
    logdir.parent.mkdir(parents=True, exist_ok=True)
    opt_path = logdir.parent / f"{name}-optimizer.json"
    opt_path.write_text(json.dumps(opt))
    accum = case["grad_accum"]
    run = {
        "logdir": str(logdir),
        "project_name": name,
        "data_root": files["data"],
        "optimizer_config": str(opt_path),
        "resume_ckpt": "builtin:tiny-sd1" if case["model"] == "sd1" else "builtin:tiny-sd2",
        "enable_zero_terminal_snr": case["model"] == "sd2_ztsnr_v",
        "resolution": 64,
        "batch_size": 2 // accum,  # 4 images: 2 optimizer steps per epoch either way
        "grad_accum": accum,
        "max_epochs": 2,
        "save_every_n_epochs": 1,
        "fused_back_pass": case["fused_back_pass"],
        "weight_dtype": case["weight_dtype"],
        "cache_latents": case["latent_cache"],
        "min_snr_gamma": 5.0 if case["min_snr"] else None,
        "disable_textenc_training": case["text_encoder"] in ("frozen", "cached"),
        "cache_text_encoder_outputs": case["text_encoder"] == "cached",
        "validation_config": files["val"] if case["validation"] else None,
        "sample_prompts": files["prompts"] if case["samples"] else None,
        "sample_steps": 2,
        "sample_at_start": False,
        "cond_dropout": 0.25,
        "flip_p": 0.5,
        "lr": None,
        "no_save_ckpt": True,
    }
    if case["ema"] != "off":
        run.update(ema_decay_rate=0.8, ema_update_interval=1, ema_device=case["ema"])
    return run


def test_refused_combinations_say_why(tmp_path):
    from trainer.config import load_config
    from trainer.runtime.errors import ConfigError

    files = _files(tmp_path / "files")
    valid = next(c for c in CASES if c["model"] == "sd1")
    for values, message in INVALID:
        case = {**valid, **values}
        args = base_args(tmp_path, **overrides(case, files, tmp_path / "logs", "refused"))
        with pytest.raises(ConfigError, match=message):
            load_config(str(ROOT / "train.json"), args)


def test_an_ema_that_would_never_update_is_refused_before_the_run_folder(tmp_path, files):
    """Issue 13 item 6: 2 optimizer steps with ema_update_interval 3 exported the base model as EMA."""
    from trainer.config import load_config
    from trainer.run.session import build_session
    from trainer.runtime.errors import ConfigError

    run = overrides(dict(CASES[0], ema="cpu"), files, tmp_path / "logs", "never")
    run.update(max_epochs=1, ema_decay_rate=None, ema_strength_target=0.5, ema_update_interval=3)
    cfg = load_config(str(ROOT / "train.json"), base_args(tmp_path, **run))
    with pytest.raises(ConfigError, match="the run has 2 optimizer steps and ema_update_interval is 3"):
        build_session(cfg)
    assert not any(p for p in (tmp_path / "logs").glob("*") if not p.name.startswith("."))


# ---- one case ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return _files(tmp_path_factory.mktemp("combination-files"))


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    return tmp_path_factory.mktemp("combinations")


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_STRAIGHT: dict[int, dict] = {}  # case index -> what its straight run left (shared by the tests below)


def live_export_weights(session) -> dict:
    """The weights an export must hold: the trained tensors as they are, and frozen tensors that
    placement stored in a lower precision (a partly frozen text encoder under bf16 weights) with
    their loaded values, which is what exports write (docs/TRAINING_STEP.md, precision)."""
    with session.export_precision.restored(session.model):
        return {
            f"{comp}/{k}": t.detach().float().clone()
            for comp in ("unet", "text_encoder")
            for k, t in getattr(session.model, comp).state_dict().items()
        }


def straight_run(case: dict, files: dict[str, str], runs_root: Path) -> dict:
    """Train the case once (2 epochs x 2 steps, a checkpoint after each epoch), cached per module.

    Each case has its own logdir, so no case sees another's latent cache and the order of the
    tests does not matter.
    """
    index = CASES.index(case)
    if index not in _STRAIGHT:
        name = f"case{index:02d}"
        run = overrides(case, files, runs_root / name / "logs", name)
        summary, session = train_in_process(runs_root / name, **run)
        assert summary.status == "finished" and summary.global_step == 4
        first, final = checkpoint_dirs(session.run.path)
        assert (first.name, final.name) == (f"{name}-ep001-gs000002", f"{name}-ep002-gs000004")
        folders = ["pipeline"] + (["pipeline_ema"] if case["ema"] != "off" else [])
        _STRAIGHT[index] = {
            "run": run,
            "root": runs_root / name,
            "first": first,
            "final": final,
            "folders": {folder: pipeline_weights(final, folder) for folder in folders},
            "live": live_export_weights(session),
            "samples": sorted(p.name.split("-")[:2] for p in session.run.samples.glob("*.png")),
            "cache": session.latent_cache,
            "cache_entries": len(session.latent_cache) if session.latent_cache is not None else None,
        }
    return _STRAIGHT[index]


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_case_trains_resumes_exactly_and_exports(case, files, runs_root):
    from diffusers import StableDiffusionPipeline

    done = straight_run(case, files, runs_root)
    expected = done["folders"]

    # The export reloads in diffusers itself with the weights the run ended with.
    pipe = StableDiffusionPipeline.from_pretrained(str(done["final"] / "pipeline"), local_files_only=True)
    reloaded = {
        f"{comp}/{k}": t.float()
        for comp in ("unet", "text_encoder")
        for k, t in getattr(pipe, comp).state_dict().items()
    }
    assert_bitwise_equal(reloaded, done["live"])
    want_prediction = "epsilon" if case["model"] == "sd1" else "v_prediction"
    assert pipe.scheduler.config.prediction_type == want_prediction
    if case["text_encoder"] in ("frozen", "cached") and case["ema"] != "off":
        # Item 1: the EMA export of a frozen text encoder is the (unchanged) text encoder.
        te = {k: v for k, v in expected["pipeline_ema"].items() if k.startswith("text_encoder/")}
        assert_bitwise_equal(
            te, {k: v for k, v in expected["pipeline"].items() if k.startswith("text_encoder/")}
        )
    if case["samples"]:
        variant = "live" if case["ema"] == "off" else "ema"
        assert done["samples"] == [["gs000002", variant], ["gs000004", variant]]

    # Resume from the epoch-1 checkpoint: the same final weights, bit for bit (EMA too).
    summary, resumed = train_in_process(done["root"], **{**done["run"], "resume_ckpt": str(done["first"])})
    assert summary.status == "finished" and summary.global_step == 4 and resumed.resumed_from == done["first"]
    for folder, weights in expected.items():
        assert_bitwise_equal(pipeline_weights(done["final"], folder), weights)
    if done["cache"] is not None:
        done["cache_entries_after_resume"] = len(done["cache"])


ZTSNR_CASES = [c for c in CASES if c["model"] == "sd2_ztsnr_v"]


@pytest.mark.parametrize("case", ZTSNR_CASES, ids=[case_id(c) for c in ZTSNR_CASES])
def test_ztsnr_case_exports_the_schedule_it_trained_with(case, files, runs_root):
    done = straight_run(case, files, runs_root)
    scheduler = json.loads((done["final"] / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    assert scheduler["rescale_betas_zero_snr"] is True and scheduler["timestep_spacing"] == "trailing"


LATENT_CASE = next(c for c in CASES if c["latent_cache"])


def test_resume_reuses_the_latent_cache(files, runs_root):
    """A resume re-encoded the whole dataset (the cache key holds the model's path, and a resume
    loads the checkpoint folder). Latents encoded in batches of another size differ in the last
    bits, so with a cache shared by runs of different batch sizes a resume was not exact either."""
    done = straight_run(LATENT_CASE, files, runs_root)
    entries = done["cache_entries"]  # after the straight run: every (image, flip) once, validation images too
    if "cache_entries_after_resume" not in done:  # the matrix test above resumes this case already
        train_in_process(done["root"], **{**done["run"], "resume_ckpt": str(done["first"])})
        done["cache_entries_after_resume"] = len(done["cache"])
    assert done["cache_entries_after_resume"] == entries
