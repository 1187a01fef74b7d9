"""sd-scripts `--dataset_config` TOML and kohya's `N_name` folders -> data_root + folder settings.

sd-scripts layers options `[general]` < `[[datasets]]` < `[[datasets.subsets]]`. This trainer has
one resolution and batch size per run and per-folder settings files (docs/DATA.md), so:

* `[general]` and the first dataset's own keys (resolution, batch_size, bucket options and
  subset defaults) are converted like config-file keys; they win over the config file, as in
  sd-scripts. A later dataset with a different resolution or batch size is reported.
* each subset's `image_dir` joins `data_root`; its own `num_repeats`, `flip_aug`,
  `caption_dropout_rate`, `shuffle_caption` and `class_tokens` become `multiply.txt`, `flip_p.txt`,
  `cond_dropout.txt`, `shuffle_tags.txt` and a `local.yaml` `main_prompt` in that folder (a main
  prompt there is used only for images without a caption, like kohya's class tokens).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from trainer.importing.rows import MAPPED, NOT_SUPPORTED, Row

DATASET_KEYS = frozenset(
    [
        "resolution",
        "batch_size",
        "enable_bucket",
        "min_bucket_reso",
        "max_bucket_reso",
        "bucket_reso_steps",
        "bucket_no_upscale",
    ]
)
_FOLDER_FLOATS = {
    "flip_aug": ("flip_p.txt", lambda v: 0.5 if v else 0.0),
    "caption_dropout_rate": ("cond_dropout.txt", float),
}
_REPEAT_FOLDER = re.compile(r"^(\d+)_(.*)$")


def dataset_overrides(data: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]], list[Row]]:
    """(run-wide keys, subsets with their effective keys, rows about the file's structure)."""
    rows: list[Row] = []
    general = dict(data.get("general", {}))
    datasets = list(data.get("datasets", []))
    for key in data:
        if key not in ("general", "datasets"):
            rows.append(
                Row(
                    f"dataset_config {key}",
                    data[key],
                    "unknown key",
                    note="sd-scripts knows [general] and [[datasets]]",
                )
            )
    run = {k: v for k, v in general.items()}
    subsets: list[dict[str, Any]] = []
    for i, ds in enumerate(datasets):
        own = {k: v for k, v in ds.items() if k != "subsets"}
        if i == 0:
            run.update(own)
        else:
            for key in DATASET_KEYS & own.keys():
                if own[key] != run.get(key):
                    rows.append(
                        Row(
                            f"datasets[{i}].{key}",
                            own[key],
                            NOT_SUPPORTED,
                            note=f"one {key} per run here: datasets[0]'s value is used",
                        )
                    )
        for j, sub in enumerate(ds.get("subsets", [])):
            inherited = {**general, **{k: v for k, v in own.items() if k not in DATASET_KEYS}}
            subsets.append({"label": f"datasets[{i}].subsets[{j}]", "own": dict(sub), "inherited": inherited})
    return {k: v for k, v in run.items() if k not in _SUBSET_ONLY}, subsets, rows


_SUBSET_ONLY = frozenset(["image_dir", "metadata_file", "class_tokens", "is_reg", "num_repeats"])


def convert_subsets(ctx, subsets: list[dict[str, Any]]) -> None:
    """data_root from the subsets' image_dir, and each subset's folder settings."""
    roots: list[str] = []
    for sub in subsets:
        label, own = sub["label"], sub["own"]
        effective = {**sub["inherited"], **own}
        folder = effective.get("image_dir")
        if own.get("is_reg"):
            ctx.row(
                Row(
                    f"{label}.is_reg",
                    True,
                    NOT_SUPPORTED,
                    note="regularisation images are not supported: this subset is left out",
                )
            )
            continue
        if effective.get("metadata_file"):
            ctx.row(
                Row(
                    f"{label}.metadata_file",
                    effective["metadata_file"],
                    NOT_SUPPORTED,
                    note="kohya metadata JSON is not read: use captions or a JSON manifest (docs/DATA.md); subset left out",
                )
            )
            continue
        if not folder:
            ctx.row(Row(label, "(no image_dir)", NOT_SUPPORTED, note="a subset needs image_dir"))
            continue
        roots.append(str(folder))
        ctx.row(Row(f"{label}.image_dir", folder, MAPPED, "train.json data_root (+)"))
        repeats = effective.get("num_repeats", 1)
        if repeats != 1:
            ctx.folder_setting(folder, "multiply.txt", f"{repeats}", f"{label}.num_repeats", repeats)
        for key, (fname, conv) in _FOLDER_FLOATS.items():
            if key in effective and conv(effective[key]) != ctx.result.train.get(_RUN_KEY[key], 0.0):
                ctx.folder_setting(folder, fname, f"{conv(effective[key])}", f"{label}.{key}", effective[key])
        if effective.get("shuffle_caption") and not ctx.result.train.get("shuffle_tags"):
            ctx.folder_setting(folder, "shuffle_tags.txt", "true", f"{label}.shuffle_caption", True)
        elif "shuffle_caption" in own and not own["shuffle_caption"] and ctx.result.train.get("shuffle_tags"):
            ctx.row(
                Row(
                    f"{label}.shuffle_caption",
                    False,
                    NOT_SUPPORTED,
                    note="a folder cannot switch shuffling off with a .txt file; edit its local.yaml (shuffle_tags: false)",
                )
            )
        if effective.get("class_tokens"):
            ctx.folder_setting(
                folder,
                "local.yaml",
                f"main_prompt: {json.dumps(effective['class_tokens'])}\n",
                f"{label}.class_tokens",
                effective["class_tokens"],
                "used for images without a caption file",
            )
        for key in ("keep_tokens", "caption_extension"):
            if key in own and own[key] != sub["inherited"].get(key, own[key]):
                ctx.row(
                    Row(
                        f"{label}.{key}",
                        own[key],
                        NOT_SUPPORTED,
                        note=f"no per-folder {key} here: the run-wide value is used",
                    )
                )
        for key, value in own.items():
            if key not in _HANDLED_SUBSET_KEYS:
                ctx.subset_key(f"{label}.{key}", key, value)
    if roots:
        ctx.result.train["data_root"] = roots[0] if len(roots) == 1 else roots


_RUN_KEY = {"flip_aug": "flip_p", "caption_dropout_rate": "cond_dropout"}
_HANDLED_SUBSET_KEYS = frozenset(
    [
        "image_dir",
        "metadata_file",
        "is_reg",
        "num_repeats",
        "flip_aug",
        "caption_dropout_rate",
        "shuffle_caption",
        "class_tokens",
        "keep_tokens",
        "caption_extension",
    ]
)


def dreambooth_folders(ctx, root: str) -> None:
    """kohya's `train_data_dir/<repeats>_<class>/` layout -> multiply.txt + local.yaml main prompt."""
    path = Path(root)
    if not path.is_dir():
        return
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        match = _REPEAT_FOLDER.match(sub.name)
        if not match:
            continue
        repeats, cls = int(match.group(1)), match.group(2).strip()
        label = f"train_data_dir/{sub.name}"
        if repeats != 1:
            ctx.folder_setting(sub, "multiply.txt", str(repeats), f"{label} (repeats)", repeats)
        if cls:
            ctx.folder_setting(
                sub,
                "local.yaml",
                f"main_prompt: {json.dumps(cls)}\n",
                f"{label} (class)",
                cls,
                "used for images without a caption file",
            )
