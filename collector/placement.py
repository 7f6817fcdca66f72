"""The path rules of stored footage: a record's relative path, and the checks that a path never leaves the
store, made by `FilesystemStore` before every write, read or delete (so an older row cannot send it outside)."""

from __future__ import annotations

import os
import re
from datetime import timezone
from pathlib import Path, PurePath, PurePosixPath

from exam_contract.identifiers import check_identifier
from exam_contract.manifest import Manifest, segment_file_name

_FILE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@~-]{0,159}")


class UnsafePath(ValueError):
    """A storage path would leave storage_dir, or has a component that is not a plain name."""


def storage_relpath(manifest: Manifest, institution: str | None = None) -> PurePosixPath:
    """`{institution}/{venue}/{camera}/{YYYY}/{MM}/{DD}/{camera}@{UTC start}.ts`, built only from ids that passed
    `exam_contract.identifiers`; `institution` is the enrolled one (the manifest's by default)."""
    start = manifest.start.astimezone(timezone.utc)
    folder = PurePosixPath(check_identifier(institution or manifest.institution, "institution"),
                           check_identifier(manifest.venue, "venue"), check_identifier(manifest.camera, "camera"),
                           f"{start:%Y}", f"{start:%m}", f"{start:%d}")
    return folder / segment_file_name(manifest.camera, manifest.start)


def alternate_relpath(relpath: PurePosixPath, seq: int) -> PurePosixPath:
    """Where a segment goes when its path already holds other bytes (another seq of the camera started at the
    same millisecond): `{camera}@{start}~seq{N}.ts` in the same folder."""
    return relpath.with_name(f"{relpath.stem}~seq{seq}{relpath.suffix}")


def check_relpath(relpath: PurePath | str) -> PurePosixPath:
    """`relpath` as a PurePosixPath, after checking it is relative and each component a plain name; the check
    any store makes, whatever it keeps footage in."""
    relpath = PurePosixPath(relpath)
    parts = relpath.parts
    if not parts or relpath.is_absolute():
        raise UnsafePath(f"storage path {str(relpath)!r} is not a relative path")
    for part in parts:
        if part in (".", "..") or not _FILE_NAME_RE.fullmatch(part):
            raise UnsafePath(f"storage path {str(relpath)!r} has the component {part!r}, which is not a plain name")
    return relpath


def _inside(root: str, path: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def contained(storage_dir: Path, relpath: Path | PurePosixPath | str) -> Path:
    """`storage_dir / relpath`, after checking every component and that the deepest existing folder on the way
    (symlinks resolved) is inside `storage_dir`. Call again after creating folders."""
    relpath = check_relpath(relpath)
    root = os.path.realpath(storage_dir)
    target = Path(storage_dir) / relpath
    probe = target.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not _inside(root, os.path.realpath(probe)):
        raise UnsafePath(f"storage path {str(relpath)!r} resolves outside {storage_dir} (through {probe})")
    return target


