"""Built-in generated models: SD topology, UNet and text encoder random from a fixed seed.

`tiny-sd1` / `tiny-sd2` keep SD's exact block structure (so every key conversion is exercised
as on real models) and shrink only widths and text-encoder depth, so tests and CPU runs are
fast. Their VAE is not random: both carry the trained tiny VAE of `trainer/models/tiny_vae/`
(as SD1.x and SD2.x share one VAE), so their samples decode to images rather than colour noise.
`sd15-arch` / `sd21-arch` are full-size with random weights, for benchmarks.

Built models are cached as diffusers folders under `$SDTRAINER_CACHE` (else
`~/.cache/sdtrainer`) in `builtin/v<CACHE_VERSION>/<name>`; a build is written to a temporary
folder and renamed into place, so concurrent or killed builds never leave a broken cache.

    python -m trainer.models.builtin NAME OUTDIR
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.errors import ModelLoadError
from trainer.models.components import (
    ComponentConfigs,
    SDComponents,
    load_tokenizer,
    training_scheduler_config,
)
from trainer.models.loading import load_pipeline_folder
from trainer.models.saving import save_pipeline
from trainer.models.tiny_vae import tiny_vae_state_dict

logger = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when configs or the build procedure change: old caches are then unused


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


def cache_dir(name: str) -> Path:
    return cache_root() / "builtin" / f"v{CACHE_VERSION}" / name


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


def ensure_cached(name: str) -> Path:
    """Return the cached pipeline folder of a builtin, building it first if needed."""
    final = cache_dir(name)
    if (final / "model_index.json").is_file():
        return final
    _spec(name)
    final.parent.mkdir(parents=True, exist_ok=True)
    logger.info("building builtin:%s into %s", name, final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-building-", dir=final.parent))
    try:
        save_pipeline(build_builtin(name), tmp)
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if (final / "model_index.json").is_file():  # another process finished the same build first
            return final
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


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
