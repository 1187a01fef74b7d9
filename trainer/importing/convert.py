"""The import engine: run every converter, then account for every key no converter reported.

A key is "reported" when some row names it. After the converters (map_training, map_options,
dataset), each remaining source key is looked up in kohya_keys' tables (no counterpart / not
supported yet); anything else is an unknown key, named in the table with the closest known key
rather than dropped.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from trainer.importing import dataset as dataset_mod
from trainer.importing import map_extras, map_options, map_output
from trainer.importing.kohya_keys import NO_COUNTERPART, NOT_SUPPORTED
from trainer.importing.map_training import KEYS as TRAINING_KEYS
from trainer.importing.map_training import convert_training
from trainer.importing.readers import read_source, read_toml
from trainer.importing.rows import MAPPED, OFF, UNKNOWN, ImportResult, Row
from trainer.importing.rows import NO_COUNTERPART as S_NO_COUNTERPART
from trainer.importing.rows import NOT_SUPPORTED as S_NOT_SUPPORTED

# The kohya_ss GUI writes 0 for "unset" in these fields (it turns them into None for sd-scripts).
GUI_ZERO_IS_UNSET = frozenset(
    [
        "noise_offset",
        "clip_skip",
        "seed",
        "sample_every_n_epochs",
        "sample_every_n_steps",
        "save_every_n_epochs",
        "save_every_n_steps",
        "max_train_epochs",
        "max_train_steps",
        "min_snr_gamma",
        "min_timestep",
        "max_timestep",
        "multires_noise_iterations",
        "unet_lr",
        "text_encoder_lr",
        "save_last_n_epochs",
        "vae_batch_size",
        "ip_noise_gamma",
        "adaptive_noise_scale",
        "v_pred_like_loss",
        "stop_text_encoder_training",
        "epoch",
    ]
)
KNOWN_CONVERTED = frozenset(
    TRAINING_KEYS
    + map_extras.KEYS
    + [
        "sdxl",
        "pretrained_model_name_or_path",
        "vae",
        "v2",
        "v_parameterization",
        "max_resolution",
        "resolution",
        "train_data_dir",
        "train_batch_size",
        "max_data_loader_n_workers",
        "cache_latents",
        "shuffle_caption",
        "keep_tokens",
        "caption_dropout_rate",
        "flip_aug",
        "caption_extension",
        "caption_extention",
        "noise_offset",
        "noise_offset_random_strength",
        "multires_noise_iterations",
        "multires_noise_discount",
        "min_snr_gamma",
        "zero_terminal_snr",
        "min_timestep",
        "max_timestep",
        "loss_type",
        "mixed_precision",
        "full_bf16",
        "gradient_checkpointing",
        "gradient_accumulation_steps",
        "xformers",
        "sdpa",
        "torch_compile",
        "dynamo_backend",
        "dynamo_mode",
        "output_dir",
        "output_name",
        "save_every_n_epochs",
        "save_last_n_epochs",
        "save_state",
        "save_model_as",
        "save_precision",
        "sample_prompts",
        "sample_every_n_steps",
        "sample_at_first",
        "seed",
        "clip_skip",
        "max_token_length",
        "log_with",
        "wandb_run_name",
        "dataset_config",
    ]
)


def root_key(source: str) -> str:
    return re.split(r"[ :(]", source, maxsplit=1)[0]


class Context:
    """The source values and the result under construction, with kohya's notion of "unset"."""

    def __init__(
        self, source: str, kind: str, values: dict[str, Any], steps_per_epoch: int | None, write_dataset: bool
    ):
        self.source, self.kind, self.values = source, kind, values
        self.steps_per_epoch = steps_per_epoch
        self.write_dataset = write_dataset
        self.result = ImportResult()

    def has(self, key: str) -> bool:
        return key in self.values

    def raw(self, key: str) -> Any:
        return self.values.get(key, "(absent)")

    def get(self, key: str) -> Any:
        value = self.values.get(key)
        if value == "" or (
            self.kind == "gui" and key in GUI_ZERO_IS_UNSET and value == 0 and value is not False
        ):
            return None
        return value

    def row(self, row: Row) -> None:
        self.result.add(row)

    def folder_setting(self, folder, fname: str, text: str, source: str, value: Any, note: str = "") -> None:
        folder = Path(folder)
        self.result.folder_settings.setdefault(folder, {})[fname] = text
        how = "written" if self.write_dataset else "not written: pass --write-dataset-settings"
        self.row(
            Row(source, value, MAPPED, f"{folder / fname} = {text.strip()}", f"{note}; {how}".strip("; "))
        )

    def subset_key(self, source: str, key: str, value: Any) -> None:
        self.row(table_row(source, key, value))


SECRETS = frozenset(("wandb_api_key", "huggingface_token"))


def table_row(source: str, key: str, value: Any) -> Row:
    """The row for a key no converter handled: no counterpart, not supported (or off), or unknown."""
    if key in SECRETS and value:
        value = "(hidden)"  # a secret never reaches the table or a log
    if key in NO_COUNTERPART:
        return Row(source, value, S_NO_COUNTERPART, note=NO_COUNTERPART[key])
    if key in NOT_SUPPORTED:
        off_values, instead = NOT_SUPPORTED[key]
        if value in off_values or (isinstance(value, (list, tuple)) and not value):
            return Row(source, value, OFF, note=f"off in the source; {instead}")
        return Row(source, value, S_NOT_SUPPORTED, note=instead)
    known = [*NO_COUNTERPART, *NOT_SUPPORTED, *KNOWN_CONVERTED]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return Row(source, value, UNKNOWN, note=f"{hint}not a kohya key this import knows: not imported")


def convert_file(
    source: str | Path,
    dataset_config: str | Path | None = None,
    *,
    steps_per_epoch: int | None = None,
    write_dataset: bool = False,
) -> ImportResult:
    """Convert a kohya_ss GUI JSON or sd-scripts TOML (+ dataset TOML) into an ImportResult."""
    kind, values = read_source(source)
    return convert_values(
        str(source),
        kind,
        values,
        dataset_config,
        steps_per_epoch=steps_per_epoch,
        write_dataset=write_dataset,
    )


def convert_values(
    label: str,
    kind: str,
    values: dict[str, Any],
    dataset_config: str | Path | None = None,
    *,
    steps_per_epoch: int | None = None,
    write_dataset: bool = False,
) -> ImportResult:
    order = {k: i for i, k in enumerate(values)}
    values = dict(values)
    subsets: list[dict[str, Any]] = []
    extra_rows: list[Row] = []
    named = values.get("dataset_config") or None
    if dataset_config is None and named:
        if Path(named).is_file():
            dataset_config = named
        else:
            extra_rows.append(
                Row("dataset_config", named, S_NOT_SUPPORTED, note="file not found: pass --dataset_config")
            )
    elif "dataset_config" in values:
        note = "read from --dataset_config" if dataset_config else "empty: no dataset config"
        extra_rows.append(Row("dataset_config", values["dataset_config"], OFF, note=note))
    if dataset_config is not None:
        run, subsets, ds_rows = dataset_mod.dataset_overrides(read_toml(dataset_config))
        extra_rows += ds_rows
        for key, value in run.items():
            if key == "batch_size":
                key = "train_batch_size"
            if key == "resolution" and "max_resolution" in values:  # the GUI's name for it
                extra_rows.append(
                    Row(
                        "max_resolution",
                        values.pop("max_resolution"),
                        OFF,
                        note="the dataset config's resolution wins",
                    )
                )
            if key in values and values[key] != value:
                extra_rows.append(
                    Row(
                        f"{key} (config file)",
                        values[key],
                        OFF,
                        note=f"the dataset config's {value!r} wins, as in sd-scripts",
                    )
                )
            values[key] = value
            order.setdefault(key, len(order))
        if subsets:
            values.pop("train_data_dir", None)
    ctx = Context(label, kind, values, steps_per_epoch, write_dataset)
    for row in extra_rows:
        ctx.row(row)
    convert_training(ctx)
    for converter in (*map_options.CONVERTERS, *map_output.CONVERTERS, *map_extras.CONVERTERS):
        converter(ctx)
    if subsets:
        dataset_mod.convert_subsets(ctx, subsets)
    elif ctx.get("train_data_dir"):
        dataset_mod.dreambooth_folders(ctx, ctx.get("train_data_dir"))
    reported = {root_key(r.source) for r in ctx.result.rows}
    for key, value in values.items():
        if key not in reported:
            ctx.row(table_row(key, key, value))
    ctx.result.rows.sort(key=lambda r: order.get(root_key(r.source), len(order)))
    return ctx.result
