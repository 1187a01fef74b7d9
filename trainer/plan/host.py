"""The plan's second table: the peak resident host memory (RSS) of the run, by category.

Computed from the same shadow modules the device plan is (`fake_model.FakeRun`), at two
moments that never overlap, and the peak is the larger of the two:

* **load**: `load_model` reads the model. A single file is read whole (`read_checkpoint`: every
  tensor of the file, at the file's dtypes, EMA copies included) and converted into fp32
  components (`components_from_checkpoint` casts each component whose file tensors are not
  fp32; fp32 tensors are assigned as they are, sharing the file's storage); the file's tensors
  live until the components are built, so the peak holds both. A diffusers folder (a built-in,
  a checkpoint's `pipeline/`) is memory-mapped: its fp32 weights become resident as they are
  first read (the move to the GPU, the first step), with no second copy.
* **training and save**: on a CPU run, everything the device plan counts (the device is the
  host); the text-encoder output cache (`cache_text_encoder_outputs`: one row of 77 tokens per
  75-token chunk per distinct caption, counted as one caption per image of `data_root`); the EMA
  on the host (`ema_device: cpu`); and the copies a checkpoint save makes on the host
  (trainer/checkpointing/contents.py): `save_pipeline` moves each component's tensors to the
  host to write it (safetensors `save_file` holds a host copy of every device tensor of the file
  until it is written; on a CPU run it writes from the tensors themselves), the single-file
  export (`save_single_file`) makes a host copy of all three modules in the export dtype at once
  (none for a tensor already on the host in that dtype), and the EMA save backs the live trained
  weights up on the EMA device (`EMA.swapped_in`) while both exports run again.

Not counted: the latent cache (the run keeps it on disk, `<logdir>/latent_cache`, one file per
entry read per batch: page cache, not the process's memory), the data loader's workers and
prefetched batches, `training_state.pt` (torch.save moves one device tensor at a time to the
host), and on CUDA the host memory of the CUDA runtime. `libraries` is an estimate: the RSS of
the trainer's imports (torch, diffusers, transformers) measured on a CPU machine
(bench/host_memory_plan.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.config import TrainConfig
from trainer.models.checkpoint_io import SINGLE_FILE_SUFFIXES
from trainer.models.ldm_keys import UNET_PREFIX, VAE_PREFIX
from trainer.models.loading import BUILTIN_PREFIX
from trainer.plan.fake_model import FakeRun, module_bytes
from trainer.plan.model import GIB

# RSS of a process after importing the trainer (torch CPU, diffusers, transformers), before the
# model loads: 0.47-0.51 GiB measured by bench/host_memory_plan.py on cpu2 (2026-12-07).
LIBRARY_BYTES = int(0.5 * GIB)
CHUNK_TOKENS = 75  # tokens of a caption per text-encoder chunk (77 with BOS/EOS)
SEQ_LEN = 77

HOST_CATEGORIES = (
    "libraries",  # the imports' RSS (estimate)
    "model_file",  # load: a single file's tensors, read whole
    "model_components",  # load: the built fp32 components not sharing the file's storage
    "training_tensors",  # a CPU run: the device plan's total (the device is the host)
    "text_cache",  # cache_text_encoder_outputs: the cached hidden states
    "parked",  # frozen modules kept on the host between samples (trainer/parts/parking.py)
    "ema",  # ema_device cpu: the EMA's shadow weights
    "checkpoint_save",  # host copies made while a checkpoint is written
)
HOST_LABELS = {
    "libraries": "libraries (estimate)",
    "model_file": "model file's tensors (load)",
    "model_components": "built fp32 components (load)",
    "training_tensors": "training tensors (CPU run)",
    "text_cache": "text-encoder output cache",
    "parked": "frozen modules parked on the host",
    "ema": "EMA on the host",
    "checkpoint_save": "checkpoint save copies",
}
PHASES = {
    "load": ("libraries", "model_file", "model_components"),
    "training and save": ("libraries", "training_tensors", "text_cache", "parked", "ema", "checkpoint_save"),
}


@dataclass(frozen=True)
class HostPlan:
    """Peak host RSS by category (bytes); `phases` the total of each moment, the peak the larger."""

    categories: dict[str, int]
    notes: tuple[str, ...] = ()
    phases: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        phases = {name: sum(self.categories[k] for k in keys) for name, keys in PHASES.items()}
        object.__setattr__(self, "phases", phases)

    @property
    def total_bytes(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.__getitem__)


def fp32_bytes(module: torch.nn.Module) -> int:
    """A module's parameters and buffers with every floating-point tensor in fp32 (as loaded)."""
    unique = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * (4 if t.is_floating_point() else t.element_size()) for t in unique.values())


def bytes_in(module: torch.nn.Module, dtype: torch.dtype, *, copy_all: bool) -> int:
    """Bytes of the copies `save_single_file` makes of `module`'s state dict: floating tensors
    in `dtype`, each one that is not already a host tensor of that dtype (all when `copy_all`)."""
    total = 0
    for t in module.state_dict().values():
        want = dtype if t.is_floating_point() else t.dtype
        if copy_all or want != t.dtype:
            total += t.numel() * want.itemsize
    return total


def model_load_bytes(cfg: TrainConfig, run: FakeRun) -> tuple[int, int, list[str]]:
    """(file tensors, fp32 components not sharing them, notes) of `load_model(cfg.resume_ckpt)`."""
    modules = {"unet": run.unet, "vae": run.vae, "text_encoder": run.text_encoder}
    components = {name: fp32_bytes(m) for name, m in modules.items()}
    spec = cfg.resume_ckpt
    path = Path(spec).expanduser()
    if spec.startswith(BUILTIN_PREFIX) or not path.is_file() or path.suffix not in SINGLE_FILE_SUFFIXES:
        return 0, sum(components.values()), []
    from trainer.plan.architecture import read_header

    header = read_header(path).tensors
    file_bytes = sum(t.numel() * t.element_size() for t in header.values())
    # a component is cast to fp32 (a copy) unless its file tensors are fp32 already
    prefixes = {"unet": (UNET_PREFIX,), "vae": (VAE_PREFIX,), "text_encoder": ("cond_stage_model.",)}
    copied = 0
    for name, keys in prefixes.items():
        floats = [t for k, t in header.items() if k.startswith(keys) and t.is_floating_point()]
        if any(t.dtype != torch.float32 for t in floats):
            copied += components[name]
    return file_bytes, copied, []


def text_cache_bytes(cfg: TrainConfig, run: FakeRun, device: str, autocast) -> tuple[int, list[str]]:
    if not cfg.cache_text_encoder_outputs:
        return 0, []
    captions = count_images(cfg.data_root)
    notes = []
    if captions is None:
        notes.append("text cache: data_root not found, so no caption was counted")
        captions = 0
    chunks = max(1, math.ceil(cfg.max_token_length / CHUNK_TOKENS))
    te_dtype = run.dtypes["text_encoder"]
    # CUDA autocast runs the final layer norm in fp32 (emulation.py), so its output is fp32
    itemsize = 4 if device == "cuda" and autocast is not None else te_dtype.itemsize
    row = SEQ_LEN * chunks * run.text_encoder.config.hidden_size * itemsize
    notes.append(f"text cache: {captions} distinct captions assumed (one per image of data_root)")
    return (captions + 1) * row, notes  # + the empty caption's row (padding)


def count_images(data_root) -> int | None:
    """Image files under `data_root` (folders; a .json manifest counts its entries), or None."""
    import json

    from trainer.data.discovery import IMAGE_EXTENSIONS

    roots = data_root if isinstance(data_root, list | tuple) else [data_root]
    total, found = 0, False
    for root in roots:
        path = Path(root).expanduser()
        if path.is_dir():
            found = True
            total += sum(1 for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.is_file() and path.suffix.lower() == ".json":
            found = True
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            total += len(data) if isinstance(data, list) else len(data.get("items", data))
    return total if found else None


def save_copy_bytes(cfg: TrainConfig, run: FakeRun, device: str, parked: tuple[str, ...] = ()) -> int:
    """Host bytes a checkpoint save adds (module docstring, contents.py `_write_exports`);
    `parked` modules are on the host already."""
    from trainer.checkpointing.contents import export_dtype

    names = ("unet", "vae", "text_encoder")
    on_device = {n: device != "cpu" and n not in parked for n in names}
    pipeline = max((module_bytes(getattr(run, n)) for n in names if on_device[n]), default=0)
    single = 0
    if not cfg.no_save_ckpt:
        dtype = export_dtype(cfg)
        single = sum(bytes_in(getattr(run, n), dtype, copy_all=on_device[n]) for n in names)
    backup = 0
    if cfg.ema_enabled and (cfg.ema_device == "cpu" or device == "cpu"):
        backup = sum(p.numel() * p.element_size() for n in run.trained for p in getattr(run, n).parameters())
    return backup + max(pipeline, single)


def plan_host(
    cfg: TrainConfig,
    run: FakeRun,
    *,
    device: str,
    device_total: int,
    ema_shadow: int,
    autocast,
    parked: tuple[str, ...] = (),
) -> HostPlan:
    """The host plan of `cfg` (module docstring). `device_total`: the device plan's total;
    `ema_shadow`: the EMA's shadow bytes wherever it lives; `parked`: the frozen modules kept
    on the host between samples."""
    categories = dict.fromkeys(HOST_CATEGORIES, 0)
    file_bytes, components, notes = model_load_bytes(cfg, run)
    text, text_notes = text_cache_bytes(cfg, run, device, autocast)
    categories.update(
        libraries=LIBRARY_BYTES,
        model_file=file_bytes,
        model_components=components,
        training_tensors=device_total if device == "cpu" else 0,
        text_cache=text,
        ema=ema_shadow if cfg.ema_enabled and cfg.ema_device == "cpu" else 0,
        parked=sum(module_bytes(getattr(run, n)) for n in parked),
        checkpoint_save=save_copy_bytes(cfg, run, device, parked),
    )
    return HostPlan(categories, tuple(notes + text_notes))
