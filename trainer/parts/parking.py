"""Frozen modules kept on the host between their uses ("parked"), so the step has their memory.

With `cache_latents` the VAE encodes every image variant once, at start-up, and is then needed
only to decode samples. With `cache_text_encoder_outputs` and captions that never shuffle, the
frozen text encoder encodes every caption once, at start-up (`LoadedDataset.every_caption`), and
is then needed only for the sample prompts. On the device between those moments they would hold
memory the step could use: SD1.5's VAE and CLIP-L in fp16 are 0.39 GiB, SD2.1's CLIP-H alone
0.64 GiB. Parked modules keep their dtype on the host and come back for the sampling block
(`Parking.fetched`); the memory plan counts them there (trainer/plan/planner.py).

A use of a parked module outside `fetched` is a path nobody foresaw (a caption the up-front list
missed, say). It must neither crash on a device mismatch mid-run nor pass unnoticed: a forward
pre-hook on the module's children moves it back to the device for the rest of the run and logs a
warning naming the module. On a CPU run the moves are no-ops and the hooks still watch, so the
CPU tests see any such use.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.checkpointing.contents import CheckpointExtra
from trainer.config import TrainConfig
from trainer.data.dataset import LoadedDataset
from trainer.models.components import SDComponents
from trainer.step.training_step import TrainingStep

log = logging.getLogger(__name__)

HOST = torch.device("cpu")


def parked_modules(cfg: TrainConfig) -> tuple[str, ...]:
    """The frozen modules a run of `cfg` parks once its caches are filled (the memory plan reads
    this too). The text encoder also needs every folder to keep its tags in order, which only the
    loaded data can tell (`park_after_caches`)."""
    names = []
    if cfg.cache_latents:
        names.append("vae")
    if cfg.cache_text_encoder_outputs and not cfg.shuffle_tags:
        names.append("text_encoder")
    return tuple(names)


class Parking:
    """Parks modules on the host and fetches them back to `device` for a block."""

    def __init__(self, modules: Mapping[str, nn.Module], device: torch.device) -> None:
        self.modules = dict(modules)
        self.device = torch.device(device)
        self._parked: dict[str, list[torch.utils.hooks.RemovableHandle]] = {}
        self._in_place = False

    @property
    def parked(self) -> tuple[str, ...]:
        return tuple(self._parked)

    def park(self, name: str) -> None:
        """Move module `name` to the host and watch for uses until it is fetched."""
        module = self.modules[name]
        nn.Module.to(module, HOST)  # diffusers' own `to` warns about modules SD does not have
        watched = [module, *module.children()]  # a VAE's encode/decode call its children directly
        self._parked[name] = [m.register_forward_pre_hook(self._used_while_parked(name)) for m in watched]

    def _unpark(self, name: str) -> None:
        for handle in self._parked.pop(name):
            handle.remove()
        nn.Module.to(self.modules[name], self.device)

    def _used_while_parked(self, name: str):
        def hook(module: nn.Module, args) -> None:
            if name not in self._parked or self._in_place:
                return
            log.warning(
                "%s was used while parked on the host (an unforeseen use; the memory plan did not "
                "count it on the device): moved back to %s for the rest of the run",
                name,
                self.device,
            )
            self._unpark(name)

        return hook

    @contextmanager
    def fetched(self) -> Iterator[None]:
        """Every parked module on the device for the block (sampling), parked again after."""
        names = list(self._parked)
        for name in names:
            self._unpark(name)
        try:
            yield
        finally:
            for name in names:
                self.park(name)

    @contextmanager
    def used_in_place(self) -> Iterator[None]:
        """Uses inside the block are foreseen and run where the modules are: nothing moves, no
        warning. For the checkpoint LoRA's fidelity probe, which runs the frozen text encoder on
        whatever device holds it (the host, where the save also shows its loaded values)."""
        self._in_place = True
        try:
            yield
        finally:
            self._in_place = False


@dataclass(frozen=True)
class InPlaceExtra:
    """A `CheckpointExtra` (trainer/checkpointing/contents.py) called inside
    `Parking.used_in_place`: the checkpoint LoRA's probe runs the parked text encoder on the host."""

    parking: Parking
    extra: CheckpointExtra

    def __call__(self, checkpoint: Path, model: Any, *, step: int, base_model: str | None) -> Any:
        with self.parking.used_in_place():
            return self.extra(checkpoint, model, step=step, base_model=base_model)


def park_after_caches(
    cfg: TrainConfig, *, model: SDComponents, step: TrainingStep, data: LoadedDataset, device: torch.device
) -> Parking:
    """After the latent cache is filled: encode every caption into the text cache and park what
    `parked_modules` allows, saying what and why (or why the text encoder stays)."""
    parking = Parking({"vae": model.vae, "text_encoder": model.text_encoder}, device)
    names = list(parked_modules(cfg))
    captions = data.every_caption() if cfg.cache_text_encoder_outputs else None
    if captions is not None:
        encoded = step.fill_text_cache(captions)
        log.info("text-encoder outputs: %d caption(s) encoded up front (%d new)", len(captions), encoded)
    elif "text_encoder" in names:  # train.json keeps tags in order, but a folder shuffles them
        names.remove("text_encoder")
        if device.type != HOST.type:
            log.warning(
                "text encoder stays on %s: a folder of the data shuffles its tags (shuffle_tags), so "
                "captions are encoded as they come; the memory plan, made before the data was read, "
                "counted it on the host (%.2f GiB more on the device)",
                device,
                _bytes(model.text_encoder) / 2**30,
            )
    elif cfg.cache_text_encoder_outputs and device.type != HOST.type:
        log.info("text encoder stays on %s: shuffle_tags, so captions are encoded as they come", device)
    for name in names:
        parking.park(name)
    if names and device.type != HOST.type:
        log.info("%s kept on the host between samples (their outputs are cached)", " and ".join(names))
    return parking


def _bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
