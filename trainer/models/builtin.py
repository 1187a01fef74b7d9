"""Built-in generated models: SD topology, UNet and text encoder random from a fixed seed.

`tiny-sd1` / `tiny-sd2` keep SD's exact block structure (so every key conversion is exercised
as on real models) and shrink only widths and text-encoder depth, so tests and CPU runs are
fast. Their VAE is not random: both carry the trained tiny VAE of `trainer/models/tiny_vae/`
(as SD1.x and SD2.x share one VAE), so their samples decode to images rather than colour noise.
`sd15-arch` / `sd21-arch` are full-size with random weights, for benchmarks.

Built models are cached as diffusers folders under `$SDTRAINER_CACHE` (else
`~/.cache/sdtrainer`) in `builtin/v<CACHE_VERSION>/<name>-<inputs>`, where <inputs> is a digest
of what the build reads (the bundled component configs and tokenizer, the seed, the tiny VAE's
shipped weights): an entry built from other inputs (an older checkout whose tiny VAE or configs
differ) is never loaded, and is removed when its replacement is built. A build is written to a
temporary folder, verified and renamed into place under a file lock, so concurrent or killed
builds never leave a broken cache, and an entry missing any file is rebuilt, never loaded.

    python -m trainer.models.builtin NAME OUTDIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock

from trainer.models.components import (
    CONFIGS_DIR,
    TOKENIZER_DIR,
    ComponentConfigs,
    SDComponents,
    load_tokenizer,
    training_scheduler_config,
)
from trainer.models.pipeline_folder import load_pipeline_folder
from trainer.models.saving import save_pipeline
from trainer.models.tiny_vae import FOLDER as TINY_VAE_FOLDER
from trainer.models.tiny_vae import WEIGHTS as TINY_VAE_WEIGHTS
from trainer.models.tiny_vae import tiny_vae_state_dict
from trainer.runtime.errors import ModelLoadError

logger = logging.getLogger(__name__)

CACHE_VERSION = 3  # bump when the build procedure changes (its inputs are in the folder name)


@dataclass(frozen=True)
class BuiltinSpec:
    config: str  # folder under configs/
    seed: int
    description: str
    trained_vae: bool = False  # the VAE of trainer/models/tiny_vae/ instead of a random one


BUILTINS: dict[str, BuiltinSpec] = {
    "tiny-sd1": BuiltinSpec(
        "tiny-sd1",
        1,
        "SD1.x topology, tiny widths, 6-layer CLIP (quick_gelu), epsilon, trained tiny VAE",
        True,
    ),
    "tiny-sd2": BuiltinSpec(
        "tiny-sd2",
        2,
        "SD2.x traits, tiny widths, 5-layer OpenCLIP-style (gelu), v-pred, trained tiny VAE",
        True,
    ),
    "sd15-arch": BuiltinSpec("sd15", 15, "full-size SD1.5 architecture, random weights"),
    "sd21-arch": BuiltinSpec("sd21", 21, "full-size SD2.1 (768-v) architecture, random weights"),
}


def cache_root() -> Path:
    env = os.environ.get("SDTRAINER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sdtrainer"


def build_inputs_digest(name: str) -> str:
    """12 hex digits of sha256 over every file and setting a build of `name` reads."""
    spec = _spec(name)
    files = sorted((CONFIGS_DIR / spec.config).rglob("*")) + sorted(TOKENIZER_DIR.rglob("*"))
    if spec.trained_vae:
        files += [TINY_VAE_FOLDER / "config.json", TINY_VAE_WEIGHTS]
    digest = hashlib.sha256(f"{spec.config}|{spec.seed}|{spec.trained_vae}".encode())
    for path in (f for f in files if f.is_file() and "__pycache__" not in f.parts):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def cache_dir(name: str) -> Path:
    return cache_root() / "builtin" / f"v{CACHE_VERSION}" / f"{name}-{build_inputs_digest(name)}"


def _spec(name: str) -> BuiltinSpec:
    if name not in BUILTINS:
        raise ModelLoadError(
            f"unknown built-in model {name!r}; available: " + ", ".join(f"builtin:{n}" for n in BUILTINS)
        )
    return BUILTINS[name]


def build_builtin(name: str) -> SDComponents:
    """Generate the model in memory (fp32). The global torch RNG is left untouched."""
    spec = _spec(name)
    cfg = ComponentConfigs.bundled(spec.config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        unet, vae, text_encoder = cfg.instantiate(torch.float32)
    if spec.trained_vae:  # strict: the bundled vae/config.json must describe the shipped weights
        vae.load_state_dict(tiny_vae_state_dict(), strict=True)
    return SDComponents(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_tokenizer(cfg.tokenizer),
        scheduler_config=training_scheduler_config(cfg.scheduler),
        family=cfg.family,
        source=f"builtin:{name} ({spec.description}, seed {spec.seed})",
    )


# Files a complete cache entry holds besides its weights (written by save_pipeline).
_ENTRY_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
)
_WEIGHTS = {
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
}


def missing_cache_files(folder: Path) -> list[str]:
    """What a cache entry lacks to be loadable: configs, tokenizer, and every weight file (a
    component's single `.safetensors`, or its shard index and every shard it names)."""
    missing = [f for f in _ENTRY_FILES if not (folder / f).is_file()]
    for comp, weights in _WEIGHTS.items():
        if not (folder / comp / "config.json").is_file():
            missing.append(f"{comp}/config.json")
        single, index = folder / comp / weights, folder / comp / f"{weights}.index.json"
        if single.is_file() and single.stat().st_size > 0:
            continue
        if not index.is_file():
            missing.append(f"{comp}/{weights}")
            continue
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing += [f"{comp}/{s}" for s in shards if not (folder / comp / s).is_file()]
    return missing


def _save_build(name: str, out_dir: str) -> None:
    """Build `name` and write it to `out_dir` (run in a child process by `_build_entry`)."""
    save_pipeline(build_builtin(name), Path(out_dir))


def _build_entry(name: str, out_dir: Path) -> None:
    """Write the built model to `out_dir`. transformers' save_pretrained writes no weights on a
    rank != 0 once torch.distributed is initialised (it assumes rank 0 saves the same model), so
    such a process builds in a child process, which has no process group."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0):
        _save_build(name, str(out_dir))
        return
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")])}
    code = "import sys; from trainer.models.builtin import _save_build; _save_build(sys.argv[1], sys.argv[2])"
    result = subprocess.run(
        [sys.executable, "-c", code, name, str(out_dir)], env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise ModelLoadError(f"building builtin:{name} in a child process failed:\n{result.stderr[-3000:]}")


def ensure_cached(name: str) -> Path:
    """Return the cached pipeline folder of a builtin, building it first if needed.

    An entry is used only when `missing_cache_files` finds nothing; a broken one (from an older
    version of this code, or a damaged disk) is rebuilt with a warning, never loaded. Builds take
    a file lock, so concurrent processes (DDP ranks, parallel tests) build once and the others
    wait for and reuse that build; the build goes to a temporary folder that is verified, then
    renamed into place.
    """
    final = cache_dir(name)
    if not missing_cache_files(final):
        return final
    _spec(name)
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final.parent / f".{name}.lock")):
        if final.exists():
            missing = missing_cache_files(final)
            if not missing:  # another process built it while we waited
                return final
            logger.warning(
                "built-in model cache %s is incomplete (missing %s); rebuilding it", final, ", ".join(missing)
            )
            broken = Path(tempfile.mkdtemp(prefix=f".{name}-broken-", dir=final.parent))
            os.replace(final, broken / name)
            shutil.rmtree(broken)
        logger.info("building builtin:%s into %s", name, final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-building-", dir=final.parent))
        try:
            _build_entry(name, tmp)
            missing = missing_cache_files(tmp)
            if missing:
                raise ModelLoadError(f"building builtin:{name} wrote no {', '.join(missing)} in {tmp}")
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _remove_stale_entries(name, final)
    return final


def _remove_stale_entries(name: str, current: Path) -> None:
    """Entries of `name` built from other inputs (under the lock, after `current` is in place):
    derived data that this checkout would never load, GBs for the full-size architectures."""
    pattern = re.compile(rf"{re.escape(name)}-[0-9a-f]{{12}}")
    for entry in current.parent.iterdir():
        if entry != current and entry.is_dir() and pattern.fullmatch(entry.name):
            logger.info("removing built-in model cache %s (built from other inputs)", entry)
            shutil.rmtree(entry)


def load_builtin(name: str, *, dtype: torch.dtype = torch.float32) -> SDComponents:
    folder = ensure_cached(name)
    components = load_pipeline_folder(folder, prediction_type=None, dtype=dtype)
    components.source = f"{_spec(name).description} [builtin:{name}, cached at {folder}]"
    return components


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.models.builtin", description="Write a built-in model as a diffusers folder."
    )
    parser.add_argument("name", choices=sorted(BUILTINS), help="built-in model name")
    parser.add_argument("outdir", type=Path, help="output folder (must not exist or be empty)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.outdir.exists() and any(args.outdir.iterdir()):
        print(f"error: {args.outdir} exists and is not empty", file=sys.stderr)
        return 2
    try:
        save_pipeline(load_builtin(args.name), args.outdir)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote builtin:{args.name} to {args.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
