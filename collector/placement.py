"""Where a stored record's file lives under `storage_dir`, and the check that it never lives anywhere else.

The relative path is `{institution}/{venue}/{camera}/{YYYY}/{MM}/{DD}/{camera}@{UTC start}.ts`, built only
from ids that passed `exam_contract.identifiers` (the institution is the enrolled one). Every path is still
checked here before a write or a delete: each component must be a plain name, and the resolved folder
(symlinks followed) must be inside `storage_dir`. Readers (export, playback, scrub, enforce) resolve a row's
`storage_path` through `stored_path`, so a row written by an older version cannot send them outside either.
"""

from __future__ import annotations

import os
import re
from datetime import timezone
from pathlib import Path, PurePosixPath

from exam_contract.identifiers import check_identifier
from exam_contract.manifest import Manifest, segment_file_name

_FILE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@~-]{0,159}")


class UnsafePath(ValueError):
    """A storage path would leave storage_dir, or has a component that is not a plain name."""


def storage_relpath(manifest: Manifest, institution: str | None = None) -> Path:
    """The relative path of a segment's file; `institution` is the enrolled one (the manifest's by default)."""
    start = manifest.start.astimezone(timezone.utc)
    folder = PurePosixPath(check_identifier(institution or manifest.institution, "institution"),
                           check_identifier(manifest.venue, "venue"), check_identifier(manifest.camera, "camera"),
                           f"{start:%Y}", f"{start:%m}", f"{start:%d}")
    return Path(folder / segment_file_name(manifest.camera, manifest.start))


def _check_components(relpath: Path | PurePosixPath) -> None:
    parts = PurePosixPath(relpath).parts
    if not parts or PurePosixPath(relpath).is_absolute():
        raise UnsafePath(f"storage path {str(relpath)!r} is not a relative path")
    for part in parts:
        if part in (".", "..") or not _FILE_NAME_RE.fullmatch(part):
            raise UnsafePath(f"storage path {str(relpath)!r} has the component {part!r}, which is not a plain name")


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def contained(storage_dir: Path, relpath: Path | PurePosixPath | str) -> Path:
    """`storage_dir / relpath`, after checking every component and that the deepest existing folder on the way
    (symlinks resolved) is inside `storage_dir`. Call again after creating folders."""
    relpath = PurePosixPath(relpath)
    _check_components(relpath)
    root = os.path.realpath(storage_dir)
    target = Path(storage_dir) / relpath
    probe = target.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not _inside(root, os.path.realpath(probe)):
        raise UnsafePath(f"storage path {str(relpath)!r} resolves outside {storage_dir} (through {probe})")
    return target


def stored_path(storage_dir: Path, storage_path: str) -> Path:
    """The file of a stored row, for reading or deleting; UnsafePath if the row's path would leave storage_dir."""
    return contained(storage_dir, storage_path)
