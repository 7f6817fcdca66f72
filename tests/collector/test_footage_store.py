"""The filesystem footage store: placing never overwrites, every path is checked, reads and deletes by relpath."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path, PurePosixPath

import pytest

from collector.footage_store import FilesystemStore, PathOccupied, StoredFileMissing, UnsafePath
from tests.support.faulty_store import FaultyStore

REL = PurePosixPath("JL2201001/JL2201001-01/t101-front/2026/11/26/t101-front@20261126T010000.000Z.ts")
ALT = REL.with_name(f"{REL.stem}~seq7{REL.suffix}")


def claim(tmp_path: Path, data: bytes, name: str = "claim") -> tuple[Path, str]:
    """A verified file in staging, on the store's volume (the store hard-links it into place)."""
    path = tmp_path / "storage" / "staging" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> FilesystemStore:
    (tmp_path / "storage").mkdir()
    return FilesystemStore(tmp_path / "storage")


def test_place_links_the_claim_and_a_retry_finds_it_placed(store: FilesystemStore, tmp_path: Path) -> None:
    source, sha = claim(tmp_path, b"footage" * 100)
    placed = store.place(source, REL, sha256=sha, alternate=ALT)
    assert (placed.relpath, placed.created) == (REL, True)
    assert os.path.samefile(source, store.root / REL)   # a hard link: no second copy of the bytes
    again = store.place(source, REL, sha256=sha, alternate=ALT)
    assert (again.relpath, again.created) == (REL, False)


def test_place_never_overwrites_other_bytes(store: FilesystemStore, tmp_path: Path) -> None:
    first, first_sha = claim(tmp_path, b"first", "a")
    store.place(first, REL, sha256=first_sha)
    second, second_sha = claim(tmp_path, b"second", "b")
    placed = store.place(second, REL, sha256=second_sha, alternate=ALT)
    assert (placed.relpath, placed.created) == (ALT, True)
    third, third_sha = claim(tmp_path, b"third", "c")
    with pytest.raises(PathOccupied, match=f"{REL} and {ALT} in storage {store.root} already hold other bytes"):
        store.place(third, REL, sha256=third_sha, alternate=ALT)
    assert store.read_range(REL, 0, 100) == b"first" and store.read_range(ALT, 0, 100) == b"second"


@pytest.mark.parametrize("relpath", ["../outside.ts", "/etc/passwd", "a/../../b.ts", "a/b c.ts", ""])
def test_unsafe_paths_are_refused_by_every_operation(store: FilesystemStore, tmp_path: Path, relpath: str) -> None:
    source, sha = claim(tmp_path, b"x")
    for call in (lambda: store.place(source, relpath, sha256=sha), lambda: store.open(relpath),
                 lambda: store.exists(relpath), lambda: store.hash(relpath), lambda: store.unlink(relpath)):
        with pytest.raises(UnsafePath):
            call()


def test_a_symlink_out_of_the_store_is_refused(store: FilesystemStore, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.ts").write_bytes(b"not footage")
    (store.root / "JL2201001").symlink_to(outside)
    with pytest.raises(UnsafePath, match="resolves outside"):
        store.hash("JL2201001/x.ts")
    source, sha = claim(tmp_path, b"y")
    with pytest.raises(UnsafePath):
        store.place(source, "JL2201001/y.ts", sha256=sha)
    assert not (outside / "y.ts").exists()


def test_reads_by_relpath(store: FilesystemStore, tmp_path: Path) -> None:
    data = bytes(range(256)) * 40
    source, sha = claim(tmp_path, data)
    store.place(source, REL, sha256=sha)
    assert store.exists(REL) and store.exists(str(REL)) and store.size(REL) == len(data)
    assert store.hash(REL) == (sha, len(data))
    with store.open(REL) as handle:
        assert handle.read() == data
    assert store.read_range(REL, 1000, 10) == data[1000:1010]
    assert store.read_range(REL, len(data) - 3, 10) == data[-3:]
    with store.local_path(REL) as local:
        assert local.read_bytes() == data


def test_a_missing_file_is_named(store: FilesystemStore) -> None:
    assert not store.exists(REL)
    for call in (lambda: store.open(REL), lambda: store.hash(REL), lambda: store.size(REL),
                 lambda: store.local_path(REL).__enter__()):
        with pytest.raises(StoredFileMissing, match=f"stored file {REL} is missing from storage "):
            call()
    store.unlink(REL)  # deleting what is gone is no error


def test_unlink_and_walk_leave_staging_out(store: FilesystemStore, tmp_path: Path) -> None:
    source, sha = claim(tmp_path, b"a")
    store.place(source, REL, sha256=sha)
    (store.root / "planted.ts").write_bytes(b"b")
    assert sorted(store.walk()) == sorted([REL, PurePosixPath("planted.ts")])  # staging/claim is not footage
    store.unlink(REL)
    assert not store.exists(REL) and list(store.walk()) == [PurePosixPath("planted.ts")]


def test_the_fault_injecting_store_fails_only_what_it_is_told(store: FilesystemStore, tmp_path: Path) -> None:
    faulty = FaultyStore(store)
    source, sha = claim(tmp_path, b"a")
    faulty.fail("place", errno.ENOSPC)
    with pytest.raises(OSError) as full:
        faulty.place(source, REL, sha256=sha)
    assert full.value.errno == errno.ENOSPC and not store.exists(REL)
    faulty.heal()
    faulty.place(source, REL, sha256=sha)
    faulty.fail("open", errno.EIO, relpath=ALT)
    assert faulty.hash(REL) == (sha, 1)   # another path reads as ever
    with pytest.raises(OSError) as failing:
        faulty.hash(ALT)
    assert failing.value.errno == errno.EIO and faulty.failed == [("place", str(REL)), ("open", str(ALT))]
