"""Which architecture `resume_ckpt` names, read without loading a single weight.

The planner builds the model from its component configs on shadow tensors, so it needs the
configs, never the tensors:

* `builtin:NAME`: the bundled configs the built-in is generated from;
* a diffusers pipeline folder (or a checkpoint directory of this trainer, whose `pipeline/`
  is one; `findlast` picks it as the trainer does): the folder's `config.json` files;
* a single file: its key names and tensor shapes only (a `.safetensors` header; a `.ckpt`
  unpickled onto the meta device, `weights_only`), recognised by the loader's own functions
  (`detect_family`, `match_configs`), so the plan and the loader cannot disagree.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import CLIPTextConfig

from trainer.checkpointing import PIPELINE_DIR, find_last, open_checkpoint
from trainer.models.builtin import BUILTINS
from trainer.models.checkpoint_io import (
    SINGLE_FILE_SUFFIXES,
    RawCheckpoint,
    detect_family,
    match_configs,
)
from trainer.models.components import ComponentConfigs, family_of_text_encoder, read_json
from trainer.models.loading import BUILTIN_PREFIX
from trainer.runtime.errors import ModelLoadError

# The bundled architecture whose tokenizer settings a family uses (the plan only needs how
# many tokens a caption becomes, which the family's tokenizer decides).
TOKENIZER_OF_FAMILY = {"sd1": "sd15", "sd2": "sd21"}
# safetensors' dtype names (the header's), for the host plan's bytes of a file's tensors
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def architecture_of(resume_ckpt: str, *, logdir: str, project_name: str) -> tuple[ComponentConfigs, str]:
    """The component configs `resume_ckpt` loads, and a one-line description of where from."""
    if resume_ckpt.startswith(BUILTIN_PREFIX):
        name = resume_ckpt[len(BUILTIN_PREFIX) :]
        if name not in BUILTINS:
            raise ModelLoadError(
                f"unknown built-in model {name!r}; available: " + ", ".join(f"builtin:{n}" for n in BUILTINS)
            )
        return ComponentConfigs.bundled(BUILTINS[name].config), f"{resume_ckpt} (bundled configs)"
    if resume_ckpt == "findlast":
        info = find_last(Path(logdir), project_name)
        return _pipeline_configs(info.path / PIPELINE_DIR), f"findlast: {info.path / PIPELINE_DIR}"
    path = Path(resume_ckpt).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model {resume_ckpt!r} does not exist. Give a diffusers pipeline folder, a .safetensors/.ckpt "
            "file, or builtin:NAME (see docs/MODELS.md)."
        )
    if path.is_dir():
        if (path / "manifest.json").is_file():
            path = open_checkpoint(path).path / PIPELINE_DIR
        return _pipeline_configs(path), f"{path} (config.json files)"
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise ModelLoadError(
            f"{path} is neither a folder nor a checkpoint file ({', '.join(SINGLE_FILE_SUFFIXES)})"
        )
    header = read_header(path)
    return match_configs(header, detect_family(header)), f"{path} (tensor shapes from the file header)"


def _pipeline_configs(folder: Path) -> ComponentConfigs:
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(
            f"{folder} is not a diffusers pipeline folder (no model_index.json); the memory plan reads "
            "the architecture from its config.json files"
        )
    text_encoder = read_json(folder / "text_encoder" / "config.json")
    te_config = CLIPTextConfig(**{k: v for k, v in text_encoder.items() if k != "architectures"})
    family = family_of_text_encoder(te_config)
    return ComponentConfigs(
        name=str(folder),
        unet=read_json(folder / "unet" / "config.json"),
        vae=read_json(folder / "vae" / "config.json"),
        text_encoder=text_encoder,
        scheduler=read_json(folder / "scheduler" / "scheduler_config.json"),
        tokenizer=ComponentConfigs.bundled(TOKENIZER_OF_FAMILY[family]).tokenizer,
    )


def read_header(path: Path) -> RawCheckpoint:
    """A single file's key names, shapes and dtypes as meta tensors: no tensor data is read."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                names = f.keys()  # noqa: SIM118 (a safetensors handle is not iterable)
                tensors = {}
                for k in names:
                    part = f.get_slice(k)
                    dtype = SAFETENSORS_DTYPES.get(part.get_dtype(), torch.float32)
                    tensors[k] = torch.empty(part.get_shape(), dtype=dtype, device="meta")
                metadata = dict(f.metadata() or {})
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"{path} is not a readable .safetensors file ({e})") from e
        return RawCheckpoint(path, tensors, metadata, None)
    try:
        obj = torch.load(str(path), map_location="meta", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as e:
        raise ModelLoadError(
            f"{path}: the memory plan cannot read the file's tensor shapes ({str(e).splitlines()[0]}); "
            "the trainer's loader will say more when it loads it"
        ) from e
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path} holds a {type(obj).__name__}, not a state dict")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return RawCheckpoint(path, tensors, {}, None)
