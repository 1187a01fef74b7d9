"""Exponential moving average of the trained weights, kept on a chosen device.

Only trainable parameters (requires_grad) get a shadow copy; frozen ones never change, so the
EMA model equals the live one there. Buffers are copied (not averaged) at each update. Shadows
live on `device` (default CPU); an update moves the live tensors there in bounded chunks rather
than deep-copying the whole model on the GPU as EveryDream2 does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from trainer.runtime.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

# Live tensors are moved to the EMA device in groups of about this many bytes, which bounds the
# transient memory of an update on the EMA device.
_CHUNK_BYTES = 256 * 1024 * 1024


def decay_from_strength_target(target: float, total_updates: int) -> float:
    """Decay such that decay ** total_updates == target (ED2's `ema_strength_target`).

    `target` is the weight the starting model keeps in the EMA after all updates.
    """
    if not 0.0 < target < 1.0:
        raise ConfigError(f"ema_strength_target={target}: must be strictly between 0 and 1.")
    if total_updates < 1:
        raise ConfigError(
            f"ema_strength_target needs at least one EMA update, but the run has {total_updates}; "
            "lower ema_update_interval or train longer."
        )
    return float(target ** (1.0 / total_updates))


def ema_decay_for_run(
    *, decay_rate: float | None, strength_target: float | None, update_interval: int, total_steps: int
) -> float:
    """The decay a run's EMA uses, refusing a run whose EMA would never update.

    With fewer optimizer steps than `update_interval` no update happens, and the exported
    `pipeline_ema` would be the base model under a trained model's name; that is an error here
    (before any run folder exists), whichever of ema_decay_rate / ema_strength_target is set.
    """
    updates = total_steps // update_interval
    if updates < 1:
        key = "ema_strength_target" if decay_rate is None else "ema_decay_rate"
        raise ConfigError(
            f"{key} is set but the EMA would never update: the run has {total_steps} optimizer steps and "
            f"ema_update_interval is {update_interval}, so the exported EMA would be the untrained base "
            f"model. Set ema_update_interval to at most {total_steps} (e.g. {max(1, total_steps // 10)}), "
            f"train longer, or turn EMA off."
        )
    if decay_rate is not None:
        return float(decay_rate)
    if strength_target is None:
        raise ConfigError("EMA is enabled but neither ema_decay_rate nor ema_strength_target is set")
    return decay_from_strength_target(strength_target, updates)


def _trainable(module: nn.Module) -> dict[str, Tensor]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def _shadow_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _chunks(tensors: list[Tensor]) -> Iterator[slice]:
    start, size = 0, 0
    for i, t in enumerate(tensors):
        size += t.numel() * t.element_size()
        if size >= _CHUNK_BYTES:
            yield slice(start, i + 1)
            start, size = i + 1, 0
    if start < len(tensors):
        yield slice(start, len(tensors))


class EMA:
    """Shadow weights updated as ema = decay * ema + (1 - decay) * p every `update_interval`
    optimizer steps."""

    def __init__(
        self,
        modules: dict[str, nn.Module],
        *,
        decay: float,
        update_interval: int,
        device: torch.device | str = "cpu",
    ) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ConfigError(f"ema_decay_rate={decay}: must be between 0 and 1 (typically 0.99-0.9999).")
        if update_interval < 1:
            raise ConfigError(f"ema_update_interval={update_interval}: must be >= 1 optimizer step.")
        self.decay = float(decay)
        self.update_interval = int(update_interval)
        self.device = torch.device(device)
        self.num_updates = 0
        self._modules = dict(modules)
        self._frozen: set[str] = set()  # components whose training stopped (stop_text_encoder_training)
        self.shadow: dict[str, dict[str, Tensor]] = {}
        self.buffers: dict[str, dict[str, Tensor]] = {}
        with torch.no_grad():
            for name, module in self._modules.items():
                # At least fp32 even for bf16 weights: (1 - decay) * delta is far below bf16's resolution.
                self.shadow[name] = {
                    n: p.detach().to(self.device, dtype=_shadow_dtype(p.dtype), copy=True)
                    for n, p in _trainable(module).items()
                }
                self.buffers[name] = {
                    n: b.detach().to(self.device, copy=True) for n, b in module.named_buffers()
                }
        count = sum(t.numel() for s in self.shadow.values() for t in s.values())
        logger.info("EMA tracks %d trainable parameters on %s (decay %.6g)", count, self.device, self.decay)

    def maybe_update(self, optimizer_step: int) -> bool:
        """Update after optimizer step number `optimizer_step` (1-based) when it is a multiple of
        `update_interval`. The interval counts optimizer steps, so grad_accum is already included."""
        if optimizer_step > 0 and optimizer_step % self.update_interval == 0:
            self.update()
            return True
        return False

    @torch.no_grad()
    def update(self) -> None:
        """ema <- decay * ema + (1 - decay) * p for every tracked parameter; buffers copied."""
        weight = 1.0 - self.decay
        for name, module in self._modules.items():
            if name in self._frozen:
                continue
            live = _trainable(module)
            shadow = self.shadow[name]
            if live.keys() != shadow.keys():
                raise RuntimeError(
                    f"EMA '{name}': the set of trainable parameters changed since the EMA was created "
                    f"({len(shadow)} tracked, {len(live)} trainable now); create the EMA after freezing."
                )
            keys = list(shadow)
            ema_list = [shadow[k] for k in keys]
            live_list = [live[k].detach() for k in keys]
            for part in _chunks(live_list):
                moved = [
                    t.to(self.device, dtype=e.dtype)
                    for t, e in zip(live_list[part], ema_list[part], strict=True)
                ]
                torch._foreach_lerp_(ema_list[part], moved, weight)
            for n, b in module.named_buffers():
                self.buffers[name][n].copy_(b.detach())
        self.num_updates += 1

    def freeze(self, name: str) -> None:
        """Stop updating component `name` (its training stopped): its average so far is kept
        and still swapped in for samples and exports. Not part of the state: the run re-applies
        it when it resumes past the point where training stopped."""
        if name not in self.shadow:
            raise KeyError(f"EMA has no component {name!r}; it tracks {sorted(self.shadow)}")
        self._frozen.add(name)

    @torch.no_grad()
    def copy_to(self, name: str, module: nn.Module) -> None:
        """Write the EMA weights (and buffers) of component `name` into `module` in place."""
        if name not in self.shadow:
            raise KeyError(f"EMA has no component {name!r}; it tracks {sorted(self.shadow)}")
        params = dict(module.named_parameters())
        for n, t in self.shadow[name].items():
            params[n].copy_(t)
        buffers = dict(module.named_buffers())
        for n, t in self.buffers[name].items():
            buffers[n].copy_(t)

    @property
    def tracked(self) -> tuple[str, ...]:
        """Names of the components this EMA averages (a frozen text encoder is not one)."""
        return tuple(self.shadow)

    def _tracked_among(self, modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
        """The subset of `modules` the EMA tracks. A tracked component must be given; an untracked
        one is only accepted when nothing in it trains, since then its EMA equals the live weights."""
        missing = [name for name in self.shadow if name not in modules]
        if missing:
            raise KeyError(f"EMA tracks {missing} but only {sorted(modules)} were given to swap in")
        for name, module in modules.items():
            if name not in self.shadow and any(p.requires_grad for p in module.parameters()):
                raise RuntimeError(
                    f"'{name}' has trainable parameters but the EMA does not track it "
                    f"(it tracks {list(self.shadow)}); create the EMA after freezing."
                )
        return {name: module for name, module in modules.items() if name in self.shadow}

    @contextmanager
    def swapped_in(self, modules: dict[str, nn.Module]) -> Iterator[None]:
        """Temporarily load EMA weights into the live modules (for sampling or export).

        `modules` may hold every model component (unet, text_encoder): exactly the ones the EMA
        tracks are swapped; a frozen, untracked one (a text encoder under
        disable_textenc_training) is left as it is, which is its EMA value. The live values are
        backed up on the EMA device and restored bitwise on exit, even if the body raises.
        Nothing is deep-copied on the training device.
        """
        modules = self._tracked_among(modules)
        backups: dict[str, tuple[dict[str, Tensor], dict[str, Tensor]]] = {}
        try:
            with torch.no_grad():
                for name, module in modules.items():
                    params = dict(module.named_parameters())
                    buffers = dict(module.named_buffers())
                    backups[name] = (
                        {n: params[n].detach().to(self.device, copy=True) for n in self.shadow[name]},
                        {n: buffers[n].detach().to(self.device, copy=True) for n in self.buffers[name]},
                    )
                    self.copy_to(name, module)
            yield
        finally:
            with torch.no_grad():
                for name, (param_backup, buffer_backup) in backups.items():
                    params = dict(modules[name].named_parameters())
                    buffers = dict(modules[name].named_buffers())
                    for n, t in param_backup.items():
                        params[n].copy_(t)
                    for n, t in buffer_backup.items():
                        buffers[n].copy_(t)

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "update_interval": self.update_interval,
            "num_updates": self.num_updates,
            "shadow": {name: dict(s) for name, s in self.shadow.items()},
            "buffers": {name: dict(b) for name, b in self.buffers.items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore shadows and the update counter; the tracked components and shapes must match."""
        for section in ("shadow", "buffers"):
            mine, theirs = getattr(self, section), state[section]
            if mine.keys() != theirs.keys():
                raise CheckpointError(
                    f"EMA state has components {sorted(theirs)} but this run tracks {sorted(mine)}; "
                    "resume with the same unet/text-encoder training settings."
                )
            for name in mine:
                if mine[name].keys() != theirs[name].keys():
                    missing = sorted(mine[name].keys() - theirs[name].keys())[:3]
                    extra = sorted(theirs[name].keys() - mine[name].keys())[:3]
                    raise CheckpointError(
                        f"EMA state for '{name}' does not match the trainable parameters "
                        f"(missing {missing}, unexpected {extra}); were freezing settings changed?"
                    )
                for n, t in theirs[name].items():
                    if mine[name][n].shape != t.shape:
                        raise CheckpointError(
                            f"EMA state '{name}.{n}' has shape {tuple(t.shape)}, "
                            f"model has {tuple(mine[name][n].shape)}."
                        )
                    mine[name][n].copy_(t)
        # decay and interval come from this run's config; a change is allowed but reported.
        for key in ("decay", "update_interval"):
            if state[key] != getattr(self, key):
                logger.warning(
                    "EMA %s changed on resume: checkpoint %s, now %s", key, state[key], getattr(self, key)
                )
        self.num_updates = int(state["num_updates"])
