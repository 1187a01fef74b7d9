"""Loading and saving Stable Diffusion 1.x / 2.x components (see docs/MODELS.md).

load_model(spec) -> SDComponents   # builtin:NAME, diffusers folder, .safetensors/.ckpt
save_pipeline(components, dir)     # diffusers StableDiffusionPipeline folder
save_single_file(components, path) # original-layout .safetensors for A1111 / ComfyUI
"""

from trainer.models.builtin import BUILTINS, build_builtin, cache_dir, load_builtin
from trainer.models.components import SDComponents
from trainer.models.convert import convert_file
from trainer.models.loading import load_model
from trainer.models.saving import save_pipeline
from trainer.models.single_file import save_single_file

__all__ = [
    "BUILTINS",
    "SDComponents",
    "build_builtin",
    "cache_dir",
    "convert_file",
    "load_builtin",
    "load_model",
    "save_pipeline",
    "save_single_file",
]
