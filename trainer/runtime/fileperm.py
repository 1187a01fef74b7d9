"""Files we write get the permissions the user's umask asks for.

safetensors and `tempfile.mkstemp` create files 0600 whatever the umask, so a checkpoint written
by one account (a shared box, a container running as root) could not be read by the user's
other tools. After writing, files are set to 0666 & ~umask and folders to 0777 & ~umask, which
is what `open()` / `mkdir()` would have given them.
"""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process umask (read by setting and restoring it: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | Path) -> None:
    """Give `path` (a file, or a folder and everything under it) its umask permissions."""
    mask = current_umask()
    path = Path(path)
    targets = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in targets:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
