"""Text-encoder freezing: which CLIP parts train, decided purely, then applied as requires_grad.

EveryDream2 only left frozen parameters out of the optimizer; they kept requires_grad=True, so
autograd still computed (and never freed) their gradients. Here frozen means
requires_grad=False, set before the optimizer is built.

Rules (ED2-compatible, with ED2's `0` rejection removed):
* default: every layer, the embeddings and the final layer norm train;
* `freeze_front_n_layers` (deprecated in ED2, still honoured) is turned into
  `unfreeze_last_n_layers` exactly as ED2 does: k >= 0 means the last (layers - k) train,
  k < 0 means the last |k| train; |k| above the layer count is an error;
* `unfreeze_last_n_layers` n keeps the last n layers trainable (0 = all layers frozen). When the
  key is present (even as null, which means all layers) it wins over `freeze_front_n_layers`,
  with a warning. Whichever of the two gives n, n < the layer count freezes the embeddings by
  default (as in ED2);
* `freeze_embeddings` / `freeze_final_layer_norm` true/false override those defaults;
* clip_skip k > 1 reads hidden_states[-k], so the last k-1 layers never affect the loss: they
  are frozen too and reported. final_layer_norm is still applied to the chosen hidden state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from trainer.optim.schema import FreezingConfig
from trainer.runtime.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FreezePlan:
    """The outcome of the freezing rules for an encoder with `num_layers` layers."""

    num_layers: int
    frozen_layers: tuple[int, ...]  # by the freezing config
    unused_layers: tuple[int, ...]  # never reached because of clip_skip
    freeze_embeddings: bool
    freeze_final_layer_norm: bool

    @property
    def trainable_layers(self) -> tuple[int, ...]:
        frozen = set(self.frozen_layers) | set(self.unused_layers)
        return tuple(i for i in range(self.num_layers) if i not in frozen)

    def describe(self) -> str:
        parts = [f"layers trainable {list(self.trainable_layers)} of {self.num_layers}"]
        if self.unused_layers:
            parts.append(f"frozen as unused by clip_skip: {list(self.unused_layers)}")
        parts.append("embeddings " + ("frozen" if self.freeze_embeddings else "trainable"))
        parts.append("final_layer_norm " + ("frozen" if self.freeze_final_layer_norm else "trainable"))
        return "; ".join(parts)


def plan_text_encoder_freeze(cfg: FreezingConfig, num_layers: int, clip_skip: int = 0) -> FreezePlan:
    """Apply the rules in the module docstring. Pure: no model needed."""
    unfreeze_last = _unfreeze_last_n_layers(cfg, num_layers)
    trainable_from = 0 if unfreeze_last is None else max(0, num_layers - unfreeze_last)
    embeddings_default = unfreeze_last is not None and unfreeze_last < num_layers
    if clip_skip > num_layers:
        raise ConfigError(f"clip_skip {clip_skip} exceeds the text encoder's {num_layers} layers")
    unused_from = num_layers - (clip_skip - 1) if clip_skip > 1 else num_layers
    return FreezePlan(
        num_layers=num_layers,
        frozen_layers=tuple(range(trainable_from)),
        unused_layers=tuple(range(max(unused_from, trainable_from), num_layers)),
        freeze_embeddings=embeddings_default if cfg.freeze_embeddings is None else cfg.freeze_embeddings,
        freeze_final_layer_norm=bool(cfg.freeze_final_layer_norm),
    )


def _unfreeze_last_n_layers(cfg: FreezingConfig, num_layers: int) -> int | None:
    """How many trailing layers train (None = all, nothing specified), with ED2's conversion of
    the deprecated `freeze_front_n_layers`."""
    n = None
    k = cfg.freeze_front_n_layers
    if k is not None:
        if abs(k) > num_layers:
            raise ConfigError(
                f"text_encoder_freezing.freeze_front_n_layers: {k} is outside -{num_layers}..{num_layers} "
                f"for this text encoder's {num_layers} layers; prefer unfreeze_last_n_layers (0..{num_layers})"
            )
        n = -k if k < 0 else num_layers - k
    if "unfreeze_last_n_layers" in cfg.model_fields_set:
        if k is not None:
            logger.warning(
                "text_encoder_freezing: unfreeze_last_n_layers=%s overrides freeze_front_n_layers=%s; "
                "remove one of them",
                cfg.unfreeze_last_n_layers,
                k,
            )
        n = cfg.unfreeze_last_n_layers
        if n is not None and n < 0:
            raise ConfigError(f"text_encoder_freezing.unfreeze_last_n_layers: must be >= 0, got {n}")
    return n


@dataclass(frozen=True)
class _TextParts:
    """The parts of a CLIP text model that freezing addresses."""

    embeddings: nn.Module
    layers: nn.ModuleList  # the encoder's transformer layers, first to last
    final_layer_norm: nn.Module


def _text_parts(text_encoder: nn.Module) -> _TextParts:
    """CLIPTextModel wraps `text_model` in transformers 4.x; 5.x exposes the parts directly."""
    core = getattr(text_encoder, "text_model", text_encoder)
    embeddings = _required_part(core, "embeddings", text_encoder)
    encoder = _required_part(core, "encoder", text_encoder)
    final_layer_norm = _required_part(core, "final_layer_norm", text_encoder)
    layers = getattr(encoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise _not_clip(text_encoder, "encoder.layers")
    return _TextParts(embeddings=embeddings, layers=layers, final_layer_norm=final_layer_norm)


def _required_part(core: nn.Module, part: str, text_encoder: nn.Module) -> nn.Module:
    module = getattr(core, part, None)
    if not isinstance(module, nn.Module):
        raise _not_clip(text_encoder, part)
    return module


def _not_clip(text_encoder: nn.Module, part: str) -> ConfigError:
    return ConfigError(
        f"text_encoder_freezing: the text encoder ({type(text_encoder).__name__}) has no '{part}'; "
        "freezing needs a CLIP text model"
    )


def text_encoder_num_layers(text_encoder: nn.Module) -> int:
    return len(_text_parts(text_encoder).layers)


def apply_text_encoder_freeze(text_encoder: nn.Module, plan: FreezePlan) -> None:
    """Set requires_grad on every text-encoder parameter according to `plan`."""
    parts = _text_parts(text_encoder)
    text_encoder.requires_grad_(True)
    frozen_modules: list[nn.Module] = [parts.layers[i] for i in (*plan.frozen_layers, *plan.unused_layers)]
    if plan.freeze_embeddings:
        frozen_modules.append(parts.embeddings)
    if plan.freeze_final_layer_norm:
        frozen_modules.append(parts.final_layer_norm)
    for module in frozen_modules:
        module.requires_grad_(False)
