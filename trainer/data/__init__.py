"""Data pipeline: discovery, captions, buckets, transforms, epoch plans, loader, latent cache.

The training loop needs only `load_data`, `make_run_loader`, `LatentCache` and `fill_latent_cache`;
see docs/DATA.md.
"""

from trainer.data.buckets import SUPPORTED_RESOLUTIONS, get_buckets, nearest_bucket
from trainer.data.dataset import DataSettings, LoadedDataset, auto_num_workers, load_data
from trainer.data.items import CaptionSpec, ImageItem, Problem
from trainer.data.latent_cache import LatentCache, fill_latent_cache
from trainer.data.loaders import make_eval_loader, make_loader, make_run_loader
from trainer.data.planner import EpochPlan, SampleRef

__all__ = [
    "SUPPORTED_RESOLUTIONS",
    "CaptionSpec",
    "LoadedDataset",
    "DataSettings",
    "EpochPlan",
    "ImageItem",
    "LatentCache",
    "Problem",
    "SampleRef",
    "auto_num_workers",
    "fill_latent_cache",
    "get_buckets",
    "load_data",
    "make_eval_loader",
    "make_loader",
    "make_run_loader",
    "nearest_bucket",
]
