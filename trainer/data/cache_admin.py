"""See and prune the shared latent cache, without a model.

    python -m trainer.data.cache_admin --logdir logs            # list (the default)
    python -m trainer.data.cache_admin --config train.json --prune [--dry-run]
    python -m trainer.data.cache_admin --cache DIR --prune --vae FINGERPRINT
    python -m trainer.data.cache_admin --logdir logs --prune --all

Entries are grouped by VAE fingerprint (the start-up log of a run names the one it uses). An
entry is stale when it can never be used again: its image is gone or changed since it was
encoded, it was made by an older transform version, or it has no metadata (written before
entries recorded their key). `--prune` deletes stale entries; `--vae FP` also every entry of
that VAE; `--all` everything. Deleting is always safe: a run re-encodes what it misses.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

from trainer.data.latent_cache import KEY_FIELDS, cache_directory, key_of_fields
from trainer.data.transforms import TRANSFORM_VERSION
from trainer.runtime.errors import TrainerError

NO_METADATA = "(no metadata)"


@dataclass
class Entry:
    path: Path
    bytes: int
    modified: float
    vae: str
    stale: str | None  # why the entry can never be hit again; None when it still can


@dataclass
class Group:
    vae: str
    entries: list[Entry] = field(default_factory=list)

    @property
    def stale(self) -> list[Entry]:
        return [e for e in self.entries if e.stale]


def _staleness(fields: dict[str, str] | None, key: str) -> str | None:
    if fields is None or any(k not in fields for k in KEY_FIELDS) or key_of_fields(fields) != key:
        return "no metadata (written by an older version)"
    if fields["transform"] != f"transform-v{TRANSFORM_VERSION}":
        return f"made by {fields['transform']}, now transform-v{TRANSFORM_VERSION}"
    try:
        st = os.stat(fields["image"])
    except OSError:
        return "image is gone"
    if str(st.st_size) != fields["size"] or str(st.st_mtime_ns) != fields["mtime_ns"]:
        return "image changed since it was encoded"
    return None


def scan(directory: Path) -> list[Group]:
    """Every entry of the cache in `directory`, grouped by VAE fingerprint (biggest first)."""
    groups: dict[str, Group] = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        why: str | None  # why the entry is stale, None when it can still be hit
        try:
            with safe_open(str(file), framework="pt") as f:
                fields = f.metadata()
        except (OSError, ValueError, RuntimeError) as err:  # a damaged file: it would be re-encoded
            fields, why = None, f"unreadable: {err}"
        else:
            why = _staleness(fields, file.stem)
        st = file.stat()
        vae = fields.get("vae", NO_METADATA) if fields else NO_METADATA
        entry = Entry(file, st.st_size, st.st_mtime, vae, why)
        groups.setdefault(vae, Group(vae)).entries.append(entry)
    return sorted(groups.values(), key=lambda g: -len(g.entries))


def describe(groups: list[Group], directory: Path) -> str:
    if not groups:
        return f"latent cache {directory}: empty"
    total = sum(e.bytes for g in groups for e in g.entries)
    lines = [f"latent cache {directory}: {sum(len(g.entries) for g in groups)} entries, {_mb(total)}"]
    for g in groups:
        newest = time.strftime("%Y-%m-%d %H:%M", time.localtime(max(e.modified for e in g.entries)))
        lines.append(
            f"  VAE {g.vae}: {len(g.entries)} entries, {_mb(sum(e.bytes for e in g.entries))}, "
            f"newest {newest}, {len(g.stale)} stale"
        )
    stale = sum(len(g.stale) for g in groups)
    if stale:
        lines.append(f"{stale} stale entries can never be used again: --prune deletes them")
    return "\n".join(lines)


def prune(groups: list[Group], *, vae: str | None, everything: bool, dry_run: bool) -> list[Entry]:
    """Delete (or, with dry_run, only choose) stale entries, those of `vae`, or all."""
    doomed = [e for g in groups for e in g.entries if everything or e.stale or (vae and g.vae == vae)]
    if not dry_run:
        for entry in doomed:
            entry.path.unlink(missing_ok=True)
    return doomed


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def _directory(args) -> Path:
    if args.cache:
        return Path(args.cache)
    if args.config:
        from trainer.config import load_config

        return cache_directory(load_config(args.config, []).logdir)
    return cache_directory(args.logdir)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.data.cache_admin", description=__doc__.split("\n")[0])
    where = p.add_mutually_exclusive_group()
    where.add_argument("--logdir", default="logs", help="the runs' logdir (its .cache/latents); default logs")
    where.add_argument("--config", help="a train.json: use its logdir")
    where.add_argument("--cache", help="the cache directory itself")
    p.add_argument("--list", action="store_true", help="list entries by VAE fingerprint (the default)")
    p.add_argument("--prune", action="store_true", help="delete stale entries (see --vae, --all)")
    p.add_argument("--vae", help="with --prune: also delete every entry of this VAE fingerprint")
    p.add_argument("--all", action="store_true", help="with --prune: delete every entry")
    p.add_argument("--dry-run", action="store_true", help="with --prune: say what would be deleted")
    args = p.parse_args(argv)
    if (args.vae or args.all or args.dry_run) and not args.prune:
        p.error("--vae, --all and --dry-run go with --prune")
    try:
        directory = _directory(args)
    except TrainerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if not directory.is_dir():
        print(f"latent cache {directory}: does not exist (no run with cache_latents used it yet)")
        return 0
    groups = scan(directory)
    print(describe(groups, directory))
    if args.prune:
        doomed = prune(groups, vae=args.vae, everything=args.all, dry_run=args.dry_run)
        verb = "would delete" if args.dry_run else "deleted"
        print(f"{verb} {len(doomed)} entries, {_mb(sum(e.bytes for e in doomed))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
