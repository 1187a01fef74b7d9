"""The edges of a run: signals, exit codes, early checks, finished runs, the end summary, the
latent cache across resumes, file permissions and what the console and TensorBoard show."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import ROOT, base_args, checkpoint_dirs, copy_images, run_folders, train_in_process
from trainer import cli
from trainer.config import load_config
from trainer.data.latent_cache import cache_directory, vae_fingerprint
from trainer.runtime.errors import ConfigError
from trainer.runtime.signals import StopFlag, StopNow


@pytest.fixture
def small(tmp_path) -> dict:
    """4 images at 64 px, batch 2 (2 optimizer steps an epoch), plain AdamW, no samples."""
    opt = tmp_path / "optimizer.json"
    opt.write_text(json.dumps({"base": {"optimizer": "adamw", "lr": 1e-4}, "text_encoder_overrides": None}))
    return {
        "data_root": copy_images(tmp_path / "data", 4),
        "optimizer_config": str(opt),
        "resolution": 64,
        "batch_size": 2,
        "max_epochs": 1,
        "flip_p": 0.0,
    }


def tree(path) -> dict[str, tuple[int, int]]:
    """Every file under `path` with its size and mtime: what 'nothing written' compares."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*")) if p.is_file()}


def cli_args(tmp_path, **overrides) -> list[str]:
    return ["--config", str(ROOT / "train.json"), *base_args(tmp_path, **overrides)]


# --- signals (issue 15 item 3) -------------------------------------------------------------


def test_in_process_training_leaves_signal_handlers_alone(tmp_path, small, monkeypatch):
    """Only the command installs handlers: a test calling train() keeps SIGTERM's default, so
    `timeout` still stops the test session."""
    calls = []
    real = signal.signal
    monkeypatch.setattr(signal, "signal", lambda sig, handler: calls.append(sig) or real(sig, handler))
    summary, _ = train_in_process(tmp_path, **small, stop_at_step=1, cache_latents=False)
    assert summary.global_step == 1
    assert calls == []


def test_second_signal_stops_at_once_and_handlers_are_restored():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    with StopFlag() as stop:
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested == "SIGTERM"  # first: save at the next step boundary
        with pytest.raises(StopNow):
            signal.raise_signal(signal.SIGTERM)  # second: out now
        # the second signal already put the previous handlers back
        assert signal.getsignal(signal.SIGTERM) is before[signal.SIGTERM]
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_an_interrupt_before_or_outside_the_loop_exits_130(tmp_path, small, monkeypatch):
    import trainer.run.session

    def interrupted(cfg):
        raise StopNow("SIGINT")

    monkeypatch.setattr(trainer.run.session, "build_session", interrupted)
    assert cli.main(cli_args(tmp_path, **small)) == 130
    assert not (tmp_path / "logs").exists()


# --- a whole command run: exit code, summary, log, permissions, TensorBoard ----------------


def test_command_run_ends_cleanly_and_explains_itself(tmp_path, small, caplog):
    """stop_at_step is a normal end (exit 0); the handlers are restored; the summary names the
    .safetensors and where it goes; model: is logged once; exported files follow the umask; the
    effective config is readable in TensorBoard."""
    caplog.set_level(logging.INFO)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    old_umask = os.umask(0o002)
    try:
        code = cli.main(cli_args(tmp_path, **small, stop_at_step=1))
    finally:
        os.umask(old_umask)
    assert code == 0
    assert {sig: signal.getsignal(sig) for sig in before} == before
    (run,) = run_folders(tmp_path / "logs")
    (ckpt,) = checkpoint_dirs(run)
    log_text = (run / "train.log").read_text()
    assert "finished at stop_at_step 1" in log_text and "interrupted" not in log_text
    assert log_text.count("model: ") == 1
    assert f"model file: {ckpt / (ckpt.name + '.safetensors')}" in log_text
    assert "models/Stable-diffusion/" in log_text and "ComfyUI/models/checkpoints/" in log_text
    assert f"StableDiffusionPipeline.from_pretrained({str(ckpt / 'pipeline')!r})" in log_text

    modes = {str(p.relative_to(run)): p.stat().st_mode & 0o777 for p in ckpt.rglob("*")}
    wrong = {p: oct(m) for p, m in modes.items() if m != (0o775 if (run / p).is_dir() else 0o664)}
    assert not wrong, wrong  # safetensors alone writes 0600
    latents = list(cache_directory(tmp_path / "logs").glob("*.safetensors"))
    assert latents and all(p.stat().st_mode & 0o777 == 0o664 for p in latents)

    acc = EventAccumulator(str(run), size_guidance={"tensors": 0})
    acc.Reload()
    text = acc.Tensors("config/train/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(text.replace("\n    ", "\n"))["stop_at_step"] == 1
    assert "config/optimizer/text_summary" in acc.Tags()["tensors"]


# --- latent cache across resume, finished runs (items 4 and 6, issue 22 item 1) ------------


def test_resume_reuses_the_latent_cache_and_a_finished_run_writes_nothing(tmp_path, small, caplog):
    caplog.set_level(logging.INFO)
    cache = cache_directory(tmp_path / "logs")
    first, s1 = train_in_process(tmp_path, **small, stop_at_step=1, project_name="p")
    entries = sorted(p.name for p in cache.glob("*.safetensors"))
    assert len(entries) == 4 and first.global_step == 1
    caplog.clear()
    second, s2 = train_in_process(tmp_path, **small, project_name="p", resume_ckpt="findlast")
    assert s2.resumed_from is not None and second.status == "finished" and second.global_step == 2
    assert s2.latent_cache.vae_fingerprint == s1.latent_cache.vae_fingerprint
    assert sorted(p.name for p in cache.glob("*.safetensors")) == entries  # no new entries
    assert "4 reused" in caplog.text and "0 computed" in caplog.text

    caplog.clear()
    written = tree(tmp_path / "logs")
    assert cli.main(cli_args(tmp_path, **small, project_name="p", resume_ckpt="findlast")) == 0
    assert "is a finished run: it trained 1 epochs (2 optimizer steps)" in caplog.text
    assert "raise max_epochs" in caplog.text
    assert tree(tmp_path / "logs") == written


def test_vae_fingerprint_does_not_read_device_weights(tmp_path, small, monkeypatch):
    """The fingerprint is taken before the VAE moves: a VAE whose weights are then on a device
    numpy cannot read (meta here, CUDA on a GPU) still gets the fingerprint of its CPU weights."""
    import trainer.parts.builder as builder_mod
    import trainer.run.session as session_mod
    from trainer.models import load_model

    real_place = builder_mod.place_models

    def place_on_meta(model, *args, **kwargs):
        real_place(model, *args, **kwargs)
        model.vae.to("meta")

    monkeypatch.setattr(builder_mod, "place_models", place_on_meta)
    monkeypatch.setattr(session_mod, "fill_latent_cache", lambda *a, **k: None)  # a meta VAE cannot encode
    monkeypatch.setattr(session_mod, "park_after_caches", lambda *a, **k: None)  # nor move to the host
    cfg = load_config(str(ROOT / "train.json"), base_args(tmp_path, **small, cache_latents=True))
    session = session_mod.build_session(cfg)
    session.close()
    expected = vae_fingerprint(load_model("builtin:tiny-sd1").vae.state_dict(), torch.float32)
    assert session.latent_cache.vae_fingerprint == expected
    with pytest.raises(ValueError, match="meta device"):
        vae_fingerprint(session.model.vae.state_dict())


# --- early checks (item 5) ------------------------------------------------------------------


def _checkpoint_like(tmp_path):
    run = tmp_path / "old-run"
    (run / "checkpoints" / "p-ep001").mkdir(parents=True)
    (run / "checkpoints" / "p-ep001" / "training_state.pt").write_bytes(b"x")
    return run


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"data_root": "{tmp}/nowhere"}, "data_root '{tmp}/nowhere' does not exist"),
        ({"sample_prompts": "{tmp}/prompts.txt"}, "sample_prompts: file '{tmp}/prompts.txt' does not exist"),
        ({"validation_config": "{tmp}/val.json"}, "validation_config {tmp}/val.json: cannot read"),
        ({"resume_ckpt": "{tmp}/old-run"}, "resume_ckpt: '{tmp}/old-run' is a run folder"),
        (
            {"resume_ckpt": "{tmp}/old-run/checkpoints/p-ep001/training_state.pt"},
            "is a training state, not a model; give its checkpoint folder",
        ),
        ({"resume_ckpt": "{tmp}/old-run/checkpoints"}, "is a folder with neither manifest.json"),
    ],
)
def test_bad_inputs_fail_before_the_model_loads_and_leave_no_run_folder(
    tmp_path, small, monkeypatch, overrides, message
):
    import trainer.parts.builder as builder_mod
    import trainer.run.session as session_mod

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(builder_mod, "load_model", no_load)
    _checkpoint_like(tmp_path)
    overrides = {k: v.format(tmp=tmp_path) for k, v in overrides.items()}
    cfg = load_config(str(ROOT / "train.json"), base_args(tmp_path, **{**small, **overrides}))
    with pytest.raises(ConfigError) as err:
        session_mod.build_session(cfg)
    assert message.format(tmp=tmp_path) in str(err.value)
    assert not (tmp_path / "logs").exists()


def test_every_bad_input_is_reported_at_once(tmp_path, small):
    import trainer.run.session as session_mod

    bad = {**small, "data_root": str(tmp_path / "gone"), "sample_prompts": str(tmp_path / "p.txt")}
    cfg = load_config(str(ROOT / "train.json"), base_args(tmp_path, **bad))
    with pytest.raises(ConfigError, match="2 problems with the inputs") as err:
        session_mod.build_session(cfg)
    assert "data_root" in str(err.value) and "sample_prompts" in str(err.value)


# --- console output (item 6) ------------------------------------------------------------------


class Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_known_harmless_library_warnings_are_hidden_and_others_kept():
    """Hidden by logger and whole message; the same loggers' other warnings still show."""
    from trainer.runtime.console import hide_known_harmless_warnings

    hide_known_harmless_warnings()
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    tf = logging.getLogger("transformers.utils.import_utils")  # transformers does not propagate
    hub = logging.getLogger("kernels._internals.hf_hub")
    seen = Collect()
    levels = {logger: logger.level for logger in (bnb, tf, hub)}
    for logger in (bnb, tf, hub):
        logger.addHandler(seen)
        logger.setLevel(logging.WARNING)  # whatever verbosity an earlier test left transformers at
    try:
        bnb.warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
            "`pip install kernels` and the kernels >= 0.11.1",
            ModuleNotFoundError("No module named 'kernels'"),
        )
        tf.warning(
            "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil` "
            "for backward compatibility. Install torchvision to use the default backend, or import "
            "`CLIPImageProcessorPil` directly to silence this warning."
        )
        hub.warning(
            "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because "
            "Hugging Face Hub is in offline mode."
        )
        assert seen.messages == []
        bnb.warning("Failed to load CUDA binary")
        tf.warning("`CLIPImageProcessor` is deprecated")
        hub.warning(
            "Skipping publisher trust check for 'someone-else/kernel' because Hugging Face Hub is in offline mode."
        )
    finally:
        for logger in (bnb, tf, hub):
            logger.removeHandler(seen)
            logger.setLevel(levels[logger])
    assert seen.messages == [
        "Failed to load CUDA binary",
        "`CLIPImageProcessor` is deprecated",
        "Skipping publisher trust check for 'someone-else/kernel' because Hugging Face Hub is in offline mode.",
    ]


def test_log_lines_go_through_tqdm_while_the_run_shows_a_bar(tmp_path, small, monkeypatch):
    import trainer.run.loop
    import trainer.run.session

    class NoSession:
        def close(self):
            pass

    monkeypatch.setattr(trainer.run.session, "build_session", lambda cfg: NoSession())

    console = logging.StreamHandler(sys.stderr)
    root = logging.getLogger()
    root.addHandler(console)
    seen = []

    def fake_train(session, stop):
        from transformers.utils import logging as hf_logging

        seen.extend(type(h).__name__ for h in root.handlers)
        seen.append(f"transformers bars {hf_logging.is_progress_bar_enabled()}")
        raise StopNow("SIGINT")

    monkeypatch.setattr(trainer.run.loop, "train", fake_train)
    try:
        assert cli.main(cli_args(tmp_path, **small, cache_latents=False)) == 130
    finally:
        root.removeHandler(console)
    assert "_TqdmLoggingHandler" in seen and "StreamHandler" not in seen
    assert "transformers bars False" in seen  # its "Writing model shards" bar would draw over ours


def test_preview_takes_the_train_json_and_summarises_repeated_problems(tmp_path, capsys):
    from PIL import Image

    from trainer.data import preview

    data = tmp_path / "data"
    copy_images(data, 2)
    for i in range(5):
        Image.new("RGB", (20, 20), (i, 0, 0)).save(data / f"tiny{i}.png")
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"data_root": str(data), "resolution": 64, "batch_size": 2}))
    assert preview.main(["--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"2 training images in {data} at resolution 64")
    assert "batch_size 2, grad_accum 1: 1 batches" in out
    assert out.count("too small to train") == 4  # three shown, then the count of the rest
    assert "... and 2 more 'too small to train' (--json lists all)" in out


def test_a_start_up_that_fails_late_detaches_its_train_log(tmp_path, small, monkeypatch):
    """An error after the run folder exists (here: building the observers) must not leave the
    run's train.log on the root logger, where every later run in the process would write."""
    import trainer.run.session as session_mod

    def broken(*a, **k):
        raise ConfigError("broken observers")

    monkeypatch.setattr(session_mod, "load_validation_config", broken)  # read while the observers are built
    root = logging.getLogger()
    before = list(root.handlers)
    cfg = load_config(str(ROOT / "train.json"), base_args(tmp_path, **small, cache_latents=False))
    with pytest.raises(ConfigError, match="broken observers"):
        session_mod.build_session(cfg)
    assert root.handlers == before


def test_one_loader_serves_every_epoch_of_a_run(tmp_path, small, monkeypatch):
    """The training loader is built once per run, not once per epoch (so loader workers, when
    there are any, are not started again at every epoch)."""
    from trainer.run import loop

    built = []
    real = loop.make_run_loader
    monkeypatch.setattr(loop, "make_run_loader", lambda *a, **k: built.append(1) or real(*a, **k))
    summary, _ = train_in_process(tmp_path, **{**small, "max_epochs": 3}, cache_latents=False)
    assert summary.global_step == 6 and summary.epoch == 3
    assert len(built) == 1
