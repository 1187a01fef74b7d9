"""Find the training images of a `data_root` and resolve each one's caption and settings.

`discover` walks folders in sorted order (so the result does not depend on the file system),
skips hidden files and folders, survives symlink loops, reads every caption/settings source
EveryDream2 reads, and probes image sizes in a thread pool with an on-disk cache. Bad files are
reported as `Problem`s and skipped; only an unusable `data_root` raises. See docs/DATA.md.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from trainer.data.captions import (
    Report,
    Settings,
    SettingsFileError,
    build_caption,
    load_settings_file,
    merge,
    merge_all,
)
from trainer.data.folder_settings import global_layer, local_layer
from trainer.data.image_probe import ProbeError, ProbeResult, ScanCache, probe_image
from trainer.data.items import DEFAULT_BATCH_ID, ImageItem, Problem
from trainer.data.manifest import read_manifest
from trainer.data.masks import is_mask_file
from trainer.runtime.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".jfif"})
# Per-image sidecars, least to most specific; all that exist are merged (EveryDream2's order).
# A `.json` beside an image is not one: img2dataset writes its download metadata there, and
# EveryDream2 reads captions only from these files and the file name.
SIDECAR_EXTENSIONS = (".txt", ".caption", ".yml", ".yaml")
CAPTION_TEXT_EXTENSIONS = (".txt", ".caption")


@dataclass
class DiscoveryResult:
    """Trainable images (sorted by path, every setting merged) and every skipped file."""

    items: list[ImageItem]
    problems: list[Problem] = field(default_factory=list)


@dataclass(frozen=True)
class _Candidate:
    path: str  # absolute, not symlink-resolved: what the user sees
    size: int
    mtime_ns: int
    settings: Settings


def _stat_candidate(path: Path, settings: Settings, report: Report) -> _Candidate | None:
    try:
        st = path.stat()
    except OSError as e:
        report.problem(path, f"cannot stat: {e.strerror}; skipped")
        return None
    return _Candidate(os.path.abspath(path), st.st_size, st.st_mtime_ns, settings)


class _FolderWalker:
    """Depth-first, sorted walk that carries the inherited `global` layer down the tree."""

    def __init__(self, report: Report):
        self.report = report
        self.visited: set[str] = set()
        self.candidates: list[_Candidate] = []

    def walk(self, folder: Path, inherited: Settings) -> None:
        real = os.path.realpath(folder)
        if real in self.visited:  # a symlink loop, or two links to one folder: read it once
            logger.info("Skipping %s: it is the already scanned folder %s.", folder, real)
            return
        self.visited.add(real)
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            self.report.problem(folder, f"cannot list folder: {e.strerror}; its images are skipped")
            return
        files: dict[str, Path] = {}
        subfolders: list[Path] = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                if entry.is_dir():
                    subfolders.append(path)
                elif entry.is_file():
                    files[entry.name] = path
                elif entry.is_symlink():
                    self.report.problem(path, "broken symbolic link; skipped")
            except OSError as e:
                self.report.problem(path, f"cannot stat: {e.strerror}; skipped")
        by_lower: dict[str, Path] = {}
        for name, path in files.items():
            by_lower.setdefault(name.lower(), path)
        folder_global = merge(inherited, global_layer(by_lower, self.report))
        base = merge(folder_global, local_layer(by_lower, self.report))
        sidecars: dict[tuple[str, str], Path] = {}
        for path in files.values():
            sidecars.setdefault((path.stem, path.suffix.lower()), path)
        for path in files.values():
            if path.suffix.lower() in IMAGE_EXTENSIONS and not is_mask_file(path):
                self._add_image(path, base, sidecars)
        for sub in subfolders:
            self.walk(sub, folder_global)

    def _add_image(self, image: Path, base: Settings, sidecars: dict[tuple[str, str], Path]) -> None:
        if (image.stem, ".json") in sidecars:
            self.report.warn_once(
                "json-sidecar",
                f"{sidecars[(image.stem, '.json')]}: per-image .json files are not read (captions come from "
                ".txt, .caption, .yaml, .yml or the file name, as in EveryDream2); others are not reported.",
            )
        layers, has_caption_text = [base], False
        for ext in SIDECAR_EXTENSIONS:
            sidecar = sidecars.get((image.stem, ext))
            if sidecar is None:
                continue
            try:
                layers.append(load_settings_file(sidecar, self.report))
                has_caption_text = has_caption_text or ext in CAPTION_TEXT_EXTENSIONS
            except (SettingsFileError, OSError) as e:
                reason = e.message if isinstance(e, SettingsFileError) else f"cannot read: {e.strerror}"
                if has_caption_text:
                    # The caption came from the .txt/.caption: train with it, without these settings.
                    self.report.problem(sidecar, f"{reason}; its settings ignored, image {image.name} kept")
                    continue
                # This file would hold the caption: training without it would train the wrong
                # text, so the image is skipped rather than its settings.
                self.report.problem(sidecar, f"{reason}; image {image.name} skipped")
                return
        candidate = _stat_candidate(image, merge_all(layers), self.report)
        if candidate is not None:
            self.candidates.append(candidate)


def resolve_roots(data_root) -> list[Path]:
    """The folders / manifests of `data_root`; DataError naming the entry that is unusable.
    Cheap (stat only), so the trainer checks it before the model loads."""
    roots = list(data_root) if isinstance(data_root, list | tuple) else [data_root]
    if not roots:
        raise DataError("data_root is an empty list; give a folder, a .json manifest, or a list of them.")
    out = []
    for root in roots:
        if not isinstance(root, str | os.PathLike):
            raise DataError(f"data_root entry {root!r} must be a folder or .json manifest path.")
        path = Path(root).expanduser()
        if not path.exists():
            raise DataError(f"data_root '{root}' does not exist (resolved to {path.absolute()}).")
        if not path.is_dir() and not (path.is_file() and path.suffix.lower() == ".json"):
            raise DataError(f"data_root '{root}' is neither a folder nor a .json manifest.")
        out.append(path)
    return out


def require_an_image_file(data_root) -> None:
    """DataError unless some folder of `data_root` holds at least one image file.

    The check before the model loads (trainer/run/preflight.py): names only, no file is opened, and
    it stops at the first image, so it costs milliseconds where discovery (which decodes every
    header) comes after the model load. Hidden files and folders and masks do not count, as in
    `discover`; a .json manifest root counts as having images (its entries are read later).
    """
    roots = resolve_roots(data_root)
    unlisted: list[str] = []
    visited: set[str] = set()
    if any(not root.is_dir() or _holds_image(root, visited, unlisted) for root in roots):
        return
    listed = f" ({len(unlisted)} path(s) could not be read: {', '.join(unlisted[:3])})" if unlisted else ""
    raise DataError(_no_images_message(data_root) + listed)


def _holds_image(folder: Path, visited: set[str], unlisted: list[str]) -> bool:
    """Whether `folder` or a folder below it holds an image file (depth first, sorted, loops cut)."""
    real = os.path.realpath(folder)
    if real in visited:
        return False
    visited.add(real)
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        unlisted.append(f"{folder}: {e.strerror}")
        return False
    subfolders = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        image_name = Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS and not is_mask_file(entry.name)
        try:
            if image_name and entry.is_file():
                return True
            if not image_name and entry.is_dir():
                subfolders.append(Path(entry.path))
        except OSError as e:
            unlisted.append(f"{entry.path}: {e.strerror}")
    return any(_holds_image(sub, visited, unlisted) for sub in subfolders)


def _no_images_message(data_root) -> str:
    return (
        f"data_root '{data_root}' has 0 images: no files with extensions "
        f"{', '.join(sorted(IMAGE_EXTENSIONS))} were found (hidden files and folders are skipped, and "
        "*-masklabel.png masks are not training images)."
    )


def _probe(path: str) -> ProbeResult | ProbeError:
    try:
        return probe_image(path)
    except ProbeError as e:
        return e


def _probe_all(candidates: list[_Candidate], cache: ScanCache, workers: int | None) -> dict[str, object]:
    results: dict[str, object] = {}
    misses = []
    for c in candidates:
        hit = cache.get(c.path, c.size, c.mtime_ns)
        if hit is None:
            misses.append(c)
        else:
            results[c.path] = hit
    if misses:
        # The filter list is process-wide, so worker threads see this too: oversized images
        # raise instead of warning, and are reported rather than decoded.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with ThreadPoolExecutor(max_workers=workers or min(32, (os.cpu_count() or 1) + 4)) as pool:
                for c, result in zip(misses, pool.map(_probe, [c.path for c in misses]), strict=True):
                    results[c.path] = result
                    cache.put(c.path, c.size, c.mtime_ns, result)
    return results


def _to_item(c: _Candidate, result, min_side: int, report: Report) -> ImageItem | None:
    if isinstance(result, ProbeError):
        report.problem(c.path, f"{result.reason}; skipped")
        return None
    if min(result.width, result.height) < min_side:
        report.problem(
            c.path,
            f"too small to train: {result.width}x{result.height} px (min_side={min_side} px per side); skipped",
        )
        return None
    caption, s = build_caption(c.settings, c.path, report)
    return ImageItem(
        path=c.path,
        width=result.width,
        height=result.height,
        caption=caption,
        multiply=1.0 if s.multiply is None else s.multiply,
        flip_p=s.flip_p,
        cond_dropout=s.cond_dropout,
        shuffle_tags=s.shuffle_tags,
        loss_scale=1.0 if s.loss_scale is None else s.loss_scale,
        batch_id=s.batch_id or DEFAULT_BATCH_ID,
    )


def discover(
    data_root: str | Path | list,
    *,
    scan_cache: Path | None = None,
    workers: int | None = None,
    min_side: int = 64,
) -> DiscoveryResult:
    """All trainable images under `data_root` (a folder, a .json manifest, or a list of them).

    Raises DataError only if a root itself is unusable; an empty or all-bad dataset returns
    `items=[]` with the problems (call `require_trainable`). `scan_cache` is a JSON file that
    makes a restart on an unchanged dataset skip every image read; `workers` sizes the probe
    thread pool; `min_side` is the smallest width/height (px) worth training on.
    """
    started = time.perf_counter()
    report = Report()
    candidates: list[_Candidate] = []
    folder_roots = []
    for root in resolve_roots(data_root):
        if root.is_dir():
            walker = _FolderWalker(report)
            walker.walk(root, Settings())
            candidates += walker.candidates
            folder_roots.append(os.path.abspath(root))
        else:
            for image, settings in read_manifest(root, report):
                c = _stat_candidate(image, settings, report)
                if c is not None:
                    candidates.append(c)
    unique: dict[str, _Candidate] = {}
    for c in candidates:
        if c.path in unique:
            report.problem(c.path, "listed more than once in data_root; only its first occurrence is used")
        else:
            unique[c.path] = c
    cache = ScanCache(scan_cache)
    results = _probe_all(list(unique.values()), cache, workers)
    cache.prune(folder_roots, set(unique))
    cache.save()
    converted = [
        _to_item(c, results[c.path], min_side, report) for c in sorted(unique.values(), key=lambda c: c.path)
    ]
    items = [i for i in converted if i is not None]
    logger.info(
        "data_root %s: %d images (%d sizes from the scan cache), %d problems, %.2fs",
        data_root,
        len(items),
        cache.hits,
        len(report.problems),
        time.perf_counter() - started,
    )
    return DiscoveryResult(items=items, problems=report.problems)


def require_trainable(result: DiscoveryResult, data_root) -> None:
    """Raise DataError explaining why, if discovery found nothing to train on."""
    if result.items:
        return
    if not result.problems:
        raise DataError(_no_images_message(data_root))
    shown = "; ".join(str(p) for p in result.problems[:5])
    more = f" (and {len(result.problems) - 5} more)" if len(result.problems) > 5 else ""
    raise DataError(
        f"data_root '{data_root}' has 0 images: {len(result.problems)} problems found: {shown}{more}"
    )
