"""The fidelity report: how much of the fine-tune a LoRA file keeps, printed and saved beside it.

Three numbers answer "which rank do I need": per block and overall, the fraction of the weight
change's energy (squared Frobenius norm) the ranks keep; the share of the change no LoRA key
can carry (biases, norms, embeddings, conv_in/out, the time embedding, and k x k convolutions
without --conv_rank); and the UNet's prediction error of base + LoRA against the fine-tune
(`probe`). The report is a typed dataclass; `format()` is what is printed and written to
`<file>.fidelity.txt`, `to_json()` what is written to `<file>.fidelity.json`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from trainer.export.extract import ExtractedLora, LayerResult
from trainer.export.naming import block_order
from trainer.export.probe import PredictionError


@dataclass(frozen=True)
class BlockRow:
    block: str  # unet.down_blocks.0, unet.mid_block, text_encoder.layers.3, ...
    layers: int
    rank_min: int
    rank_max: int
    share: float  # this block's share of the carried layers' change energy
    kept: float  # fraction of this block's change energy the ranks keep


@dataclass(frozen=True)
class FidelityReport:
    settings: str  # the rank settings in words
    conv_rank: int  # 0: k x k convolutions are not written (their change counts as not carried)
    blocks: list[BlockRow]
    layers: int  # layers written
    unchanged_layers: int  # covered layers the fine-tune left as they were (not written)
    clamped_layers: int  # layers smaller than the rank asked for (written at full rank)
    kept_fraction: float  # of the carried layers' change energy
    uncarried_fraction: float  # of the whole change energy, in parameters no LoRA key carries
    kept_of_all: float  # kept energy over the whole change energy
    largest_uncarried: list[tuple[str, float]]  # (parameter, share of the whole change), largest first
    kept_by_rank: dict[int, float]  # what the same layers would keep at other ranks (all layers at r)
    prediction: PredictionError | None
    components: list[str]

    def to_json(self) -> str:
        """Strict JSON: a relative error with no ratio (base and fine-tune predict alike) is null."""
        data = asdict(self)
        if self.prediction is not None and math.isnan(self.prediction.relative):
            data["prediction"]["relative"] = None
        return json.dumps(data, indent=2, allow_nan=False)

    def format(self) -> str:
        lines = [f"LoRA fidelity ({self.settings}; {', '.join(self.components)})"]
        lines.append(f"  {'block':<26}{'layers':>7}  {'rank':<9}{'share':>8}{'kept':>9}")
        for row in self.blocks:
            lines.append(_row(row.block, row.layers, row.rank_min, row.rank_max, row.share, row.kept))
        lo = min((r.rank_min for r in self.blocks), default=0)
        hi = max((r.rank_max for r in self.blocks), default=0)
        lines.append(_row("all written layers", self.layers, lo, hi, 1.0, self.kept_fraction))
        ladder = ", ".join(f"{rank}: {kept:.1%}" for rank, kept in self.kept_by_rank.items())
        lines.append(f"  the same layers at one rank r would keep (r: kept): {ladder}")
        lines += self._notes()
        return "\n".join(lines)

    def _notes(self) -> list[str]:
        notes = [
            f"  not carried by any LoRA key (biases, norms, embeddings, conv_in/out, time embedding"
            f"{', ResNet and resampling layers (--conv_rank > 0 writes them)' if self.conv_rank == 0 else ''}): "
            f"{self.uncarried_fraction:.2%} of the weight change",
            f"  kept of the whole weight change: {self.kept_of_all:.2%}",
        ]
        if self.largest_uncarried:
            top = ", ".join(f"{name} {share:.1%}" for name, share in self.largest_uncarried)
            notes.append(f"  largest changes not carried: {top}")
        if self.unchanged_layers:
            notes.append(
                f"  {self.unchanged_layers} covered layer(s) unchanged by the fine-tune: not written"
            )
        if self.clamped_layers:
            notes.append(
                f"  {self.clamped_layers} layer(s) smaller than the rank asked for: written at full rank"
            )
        p = self.prediction
        if p is None:
            notes.append("  UNet prediction error: not measured")
        elif math.isnan(p.relative):
            notes.append("  UNet prediction error: base and fine-tune predict alike on the probe (no ratio)")
        else:
            notes.append(
                f"  UNet prediction error, base + LoRA vs the fine-tune: {p.relative:.4f} "
                f"(0 = the fine-tune, 1 = no better than the base; RMS {p.lora_rms:.3g} vs "
                f"{p.base_rms:.3g} for the base; {p.samples} prompts x timesteps at {p.latent_size}x"
                f"{p.latent_size} latents)"
            )
        return notes

    def write_beside(self, lora_file: Path) -> tuple[Path, Path]:
        """`<file>.fidelity.txt` and `<file>.fidelity.json` next to the LoRA file."""
        stem = lora_file.with_suffix("")
        text, data = Path(f"{stem}.fidelity.txt"), Path(f"{stem}.fidelity.json")
        text.write_text(self.format() + "\n", encoding="utf-8")
        data.write_text(self.to_json() + "\n", encoding="utf-8")
        return text, data


def _row(name: str, layers: int, lo: int, hi: int, share: float, kept: float) -> str:
    ranks = f"{lo}" if lo == hi else f"{lo}-{hi}"
    return f"  {name:<26}{layers:>7}  {ranks:<9}{share:>8.1%}{kept:>9.2%}"


def settings_words(extracted: ExtractedLora) -> str:
    s = extracted.settings
    if s.keep is None:
        return f"rank {s.rank}, conv {s.conv_rank}"
    return f"dynamic: keep {s.keep:g} of each layer, rank at most {s.rank}, conv {s.conv_rank}"


def block_rows(layers: list[LayerResult]) -> list[BlockRow]:
    total = sum(r.energy for r in layers)
    groups: dict[str, list[LayerResult]] = {}
    for r in layers:
        groups.setdefault(r.target.block, []).append(r)
    rows = []
    for block in sorted(groups, key=block_order):
        rs = groups[block]
        energy = sum(r.energy for r in rs)
        rows.append(
            BlockRow(
                block=block,
                layers=len(rs),
                rank_min=min(r.rank for r in rs),
                rank_max=max(r.rank for r in rs),
                share=energy / total if total else 0.0,
                kept=sum(r.kept for r in rs) / energy if energy else 1.0,
            )
        )
    return rows


def build_report(extracted: ExtractedLora, prediction: PredictionError | None) -> FidelityReport:
    carried = sum(r.energy for r in extracted.layers)
    max_limit = max(r.limit for r in extracted.layers)
    kept = sum(r.kept for r in extracted.layers)
    uncarried = sum(extracted.uncarried.values())
    whole = carried + uncarried
    return FidelityReport(
        settings=settings_words(extracted),
        conv_rank=extracted.settings.conv_rank,
        blocks=block_rows(extracted.layers),
        layers=len(extracted.layers),
        unchanged_layers=len(extracted.unchanged),
        clamped_layers=sum(r.clamped for r in extracted.layers),
        kept_fraction=kept / carried if carried else 1.0,
        uncarried_fraction=uncarried / whole if whole else 0.0,
        kept_of_all=kept / whole if whole else 1.0,
        kept_by_rank={r: kept_r / carried for r, kept_r in extracted.kept_at.items() if r <= max_limit},
        largest_uncarried=[
            (name, energy / whole)
            for name, energy in sorted(extracted.uncarried.items(), key=lambda kv: -kv[1])[:3]
        ],
        prediction=prediction,
        components=extracted.components,
    )
