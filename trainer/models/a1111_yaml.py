"""The `.yaml` A1111 / Forge read beside a single file, for the files that need one.

A1111 takes a checkpoint's ldm model config from `<stem>.yaml` beside the file and otherwise
picks one from the weights (`sd_models_config.guess_model_config_from_state_dict`): for SD1.x
always `v1-inference.yaml`, epsilon; for SD2.x it *guesses* v or epsilon from one test forward
pass of the UNet. Of the config it uses the architecture, `parameterization` and `use_ema`; it
has no key for zero terminal SNR (that is its "Noise schedule for sampling" setting).

So a file gets a yaml when A1111 would otherwise run it wrongly or by a guess: every
v-prediction model (SD1 and SD2) and every SD2 model (for epsilon, v2-inference.yaml without
`parameterization` settles the guess). An SD1 epsilon model gets none: A1111's default is right.
The yaml is a bundled published config (`configs/`) with this model's UNet/VAE sizes filled in.
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from trainer.models.components import CONFIGS_DIR, SDComponents

logger = logging.getLogger(__name__)

SD1_V_TEMPLATE = CONFIGS_DIR / "v1-inference-v.yaml"  # v1-inference.yaml + parameterization "v"
SD2_TEMPLATE = CONFIGS_DIR / "v2-inference-v.yaml"


def yaml_template(components: SDComponents) -> Path | None:
    """The bundled config this model's yaml starts from, or None when A1111 needs none."""
    if components.family == "sd2":
        return SD2_TEMPLATE
    return SD1_V_TEMPLATE if components.prediction_type == "v_prediction" else None


def a1111_yaml(components: SDComponents, template: Path) -> str:
    """`template` with `parameterization` as the model predicts and its UNet/VAE sizes filled in."""
    doc = yaml.safe_load(template.read_text(encoding="utf-8"))
    params = doc["model"]["params"]
    if components.prediction_type != "v_prediction":
        params.pop("parameterization", None)
    # diffusers types `.config` as a plain dict (attribute access works only at runtime): index it.
    u, v = components.unet.config, components.vae.config
    unet_params = params["unet_config"]["params"]
    base = u["block_out_channels"][0]
    unet_params["model_channels"] = base
    unet_params["channel_mult"] = [c // base for c in u["block_out_channels"]]
    # diffusers' `attention_head_dim` is a head count (SD1: 8; SD2: per level, 5/10/20/20);
    # SD1's config names the count, SD2's the channels per head.
    head_dim = u["attention_head_dim"]
    heads = head_dim if isinstance(head_dim, list | tuple) else [head_dim]
    if "num_heads" in unet_params:
        unet_params["num_heads"] = heads[0]
    else:
        unet_params["num_head_channels"] = base // heads[0]
    unet_params["context_dim"] = u["cross_attention_dim"]
    unet_params["num_res_blocks"] = u["layers_per_block"]
    params["scale_factor"] = v["scaling_factor"]
    dd = params["first_stage_config"]["params"]["ddconfig"]
    dd["ch"] = v["block_out_channels"][0]
    dd["ch_mult"] = [c // v["block_out_channels"][0] for c in v["block_out_channels"]]
    return yaml.safe_dump(doc, sort_keys=False)


def write_a1111_yaml(components: SDComponents, single_file: Path) -> Path | None:
    """Write `<stem>.yaml` beside `single_file` when the model needs one; returns its path.

    When it needs none, a yaml already there (from an earlier export under the same name) is
    removed with a warning: A1111 and this trainer's loader would read the new file through it.
    """
    path = Path(single_file).with_suffix(".yaml")
    template = yaml_template(components)
    if template is None:
        if path.exists():
            logger.warning(
                "removed %s: it described an earlier file named %s, and A1111 would read this %s %s "
                "model through it",
                path,
                Path(single_file).name,
                components.family,
                components.prediction_type,
            )
            path.unlink()
        return None
    path.write_text(a1111_yaml(components, template), encoding="utf-8")
    return path
