"""Image size and integrity checks that read as little of each file as possible, and their cache.

Discovery needs every image's displayed size (for buckets) and must know that the file will
decode, so that a truncated image is skipped at start-up instead of crashing a worker hours
into a run. Header reads are cheap but succeed on truncated files, so each format also gets the
cheapest check that reaches the end of the data: PNG chunk CRCs up to IEND (no inflate), JPEG
decoded at 1/8 scale via `draft()`, other formats decoded fully. Results are cached on disk by
path + size + mtime, so a restart on an unchanged dataset opens no image at all.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from trainer.runtime.fileperm import apply_umask

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
# EXIF orientations 5-8 are rotations by 90/270 degrees: the displayed image has w and h swapped.
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION = 0x0112
# What PIL raises for malformed files (its plugins use several); anything else is a bug and
# propagates with the file name attached.
DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    zlib.error,
    IndexError,
    KeyError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)


class ProbeError(Exception):
    """The file is not a usable image; `reason` is shown to the user. `cacheable` is False for
    conditions that can change without the file changing (permissions)."""

    def __init__(self, reason: str, cacheable: bool = True):
        super().__init__(reason)
        self.reason = reason
        self.cacheable = cacheable


@dataclass(frozen=True)
class ProbeResult:
    """Displayed size (after EXIF orientation) of an image that decodes."""

    width: int
    height: int


def _displayed_size(im: Image.Image) -> tuple[int, int]:
    w, h = im.size
    # PNG's getexif() decodes the whole image unless the eXIf chunk precedes the pixel data, so
    # for PNG only header EXIF is honoured (that is where writers put it).
    if im.format == "PNG" and "exif" not in im.info:
        return w, h
    orientation = im.getexif().get(_EXIF_ORIENTATION)
    return (h, w) if orientation in _SWAPPING_ORIENTATIONS else (w, h)


def _integrity_check(im: Image.Image) -> None:
    """Reach the end of the image data cheaply; raises a DECODE_ERRORS member if truncated/corrupt."""
    if im.format == "PNG":
        im.verify()  # walks every chunk to IEND checking CRCs; no inflate
        return
    if im.format == "JPEG":
        im.draft("RGB", (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
    im.load()


def probe_image(path: str | Path) -> ProbeResult:
    """Open `path`, return its displayed size; raise ProbeError with a user-facing reason.

    Must run with DecompressionBombWarning turned into an error (discovery does this around
    its thread pool) so that oversized images are reported instead of decoded.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ProbeError("empty file (0 bytes)")
        with Image.open(path) as im:
            w, h = _displayed_size(im)
            _integrity_check(im)
    except PermissionError as e:
        raise ProbeError(f"cannot read: {e.strerror} (check the file's permissions)", cacheable=False) from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ProbeError(
            f"image too large ({e}); PIL.Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS}. "
            "Downscale it, or raise that limit if you trust the file"
        ) from e
    except Image.UnidentifiedImageError as e:
        raise ProbeError("not an image PIL can read (unknown format or corrupt header)") from e
    except DECODE_ERRORS as e:
        raise ProbeError(f"corrupt or truncated image: {type(e).__name__}: {e}") from e
    except Exception as e:
        e.add_note(f"while reading image {path}")
        raise
    return ProbeResult(w, h)


class ScanCache:
    """Probe results keyed by absolute path, valid while the file's size and mtime are unchanged.

    Stored as one JSON file written atomically (temp file + rename), so a crash or a second
    process writing at the same time never leaves a half-written cache. Entries under a
    scanned folder that were not seen again are dropped when saved.
    """

    def __init__(self, path: Path | None):
        self.path = Path(path) if path is not None else None
        self._entries: dict[str, list] = {}
        self._dirty = False
        self.hits = 0
        if self.path is not None and self.path.exists():
            self._load(self.path)

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("version") != CACHE_VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {CACHE_VERSION}")
            entries = data["entries"]
            if not isinstance(entries, dict):
                raise ValueError("'entries' is not a mapping")
        except (OSError, ValueError, KeyError, AttributeError) as e:
            logger.warning("scan cache %s is unusable (%s); rescanning all images and rewriting it.", path, e)
            return
        self._entries = entries

    def get(self, key: str, size: int, mtime_ns: int) -> ProbeResult | ProbeError | None:
        entry = self._entries.get(key)
        if not isinstance(entry, list) or len(entry) != 5 or entry[0] != size or entry[1] != mtime_ns:
            return None
        self.hits += 1
        _, _, w, h, error = entry
        return ProbeError(error) if error is not None else ProbeResult(w, h)

    def put(self, key: str, size: int, mtime_ns: int, result: ProbeResult | ProbeError) -> None:
        if isinstance(result, ProbeError):
            if not result.cacheable:
                return
            entry = [size, mtime_ns, 0, 0, result.reason]
        else:
            entry = [size, mtime_ns, result.width, result.height, None]
        if self._entries.get(key) != entry:
            self._entries[key] = entry
            self._dirty = True

    def prune(self, roots: list[str], seen: set[str]) -> None:
        """Forget entries under `roots` (folders scanned in full) that were not seen this time."""
        prefixes = tuple(os.path.join(r, "") for r in roots)
        stale = [k for k in self._entries if k.startswith(prefixes) and k not in seen]
        for k in stale:
            del self._entries[k]
        self._dirty = self._dirty or bool(stale)

    def save(self) -> None:
        if self.path is None or not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"version": CACHE_VERSION, "entries": self._entries}, f, separators=(",", ":"))
            apply_umask(tmp)  # mkstemp makes 0600 files
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._dirty = False
