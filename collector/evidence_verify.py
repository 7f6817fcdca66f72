#!/usr/bin/env python3
"""Verify an exam-footage evidence package offline: needs only Python 3.8+ and `cryptography`.

    python verify.py PACKAGE_DIR_OR_ZIP [--expect-key FINGERPRINT] [--json]

Verdicts: OK (exit 0), OK_WITH_GAPS (exit 3: footage intact, the coverage gaps listed were stated),
NOT_OK (exit 4: each problem listed). This one file is both the `verify.py` shipped inside every package
and what `exam-collector verify-package` runs, so the two verdicts cannot differ; that is why it is one
self-contained file of about 550 lines (it may import nothing from the project).

What is checked:
  0. the files present are exactly the files the package lists: an extra file anywhere (hidden ones too),
     a folder that holds no listed file, anything beside the package in a zip, and any symbolic link are
     NOT_OK, each named;
  1. package.json is signed (package.sig) by the collector key in keys/collector.pub. The verdict says
     whether that key was pinned (--expect-key, the key's full SHA-256 fingerprint, which the collector
     operator publishes) or only taken from the package, and prints the full fingerprint;
  2. every segment and gap record: its manifest is signed by the agent key the record names (`key`, the
     SHA-256 fingerprint of the raw key), read from keys/agents/{agent}/{fingerprint}.pub; each key file
     must hash to its fingerprint and be the key package.json lists for that agent. The validity listed
     with each key is not checked against the records: it says when the collector accepted the key, not
     when the agent recorded, and the collector checked each signature at ingest with the key then valid.
     Packages before v 2 name no key per record: their records are verified with keys/agents/{agent}.pub;
  3. every segment file is present, with the size and SHA-256 its signed manifest states;
  4. per camera, the hash chain: each record's `prev` is the SHA-256 of the previous record's manifest,
     and every missing sequence number is declared as a chain hole;
  5. no gap is hidden: coverage of each exam part is recomputed from the signed manifests, and every
     uncovered stretch of at least the gap tolerance must be among the gaps the package declares;
  6. the other listed files (coverage report, viewing MP4s) have their listed size and SHA-256;
  7. the audit-log checkpoint the export cites is signed by the same collector key (the export was logged);
     `exam-retention verify-log --checkpoint package.json` compares it with the collector's audit log.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import os
import re
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Dict, List, Optional, Set, Tuple

try:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
except ImportError:  # pragma: no cover - the message is the point
    sys.stderr.write("verify.py needs the `cryptography` package: pip install cryptography\n")
    sys.exit(1)

OK = "OK"
OK_WITH_GAPS = "OK_WITH_GAPS"
NOT_OK = "NOT_OK"
EXIT_CODES = {OK: 0, OK_WITH_GAPS: 3, NOT_OK: 4}
EXIT_INPUT = 1
PACKAGE_FORMAT = "exam-footage evidence package"
CHECKPOINT_KIND = "exam-collector audit checkpoint"   # must match collector/audit.py
READ_BLOCK = 4 << 20
SHANGHAI = timezone(timedelta(hours=8))  # Asia/Shanghai has no DST; no tzdata needed
KEYED_VERSION = 2   # from this package version on, every record names its key by fingerprint
FINGERPRINT = re.compile(r"[0-9a-f]{64}")


class PackageUnreadable(Exception):
    """The path is not a package at all (no folder, no zip, no package.json)."""


@dataclass
class Verification:
    verdict: str
    problems: List[str] = field(default_factory=list)
    gaps: List[str] = field(default_factory=list)
    batch: str = ""
    segments: int = 0
    bytes: int = 0
    collector_key: str = ""
    collector_fingerprint: str = ""   # SHA-256 (hex) of the raw 32 key bytes, as `exam-collector keys` prints
    key_pinned: bool = False          # the fingerprint was given (--expect-key) and matched

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    def to_dict(self) -> Dict[str, Any]:
        return {"verdict": self.verdict, "problems": self.problems, "gaps": self.gaps, "batch": self.batch,
                "segments": self.segments, "bytes": self.bytes, "collector_key": self.collector_key,
                "collector_fingerprint": self.collector_fingerprint, "collector_key_pinned": self.key_pinned}

    def render(self) -> str:
        lines = [self.verdict]
        trust = ("pinned with --expect-key" if self.key_pinned else
                 "taken from the package, NOT pinned: compare the fingerprint with the one the collector operator "
                 "publishes, or give it with --expect-key")
        lines.append(f"batch {self.batch}: {self.segments} segment files, {self.bytes} bytes")
        lines.append(f"collector key {self.collector_key}, SHA-256 fingerprint {self.collector_fingerprint} "
                     f"({trust})")
        for problem in self.problems:
            lines.append(f"PROBLEM: {problem}")
        for gap in self.gaps:
            lines.append(f"GAP: {gap}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------- small helpers

def _parse_time(text: Any) -> datetime:
    if not isinstance(text, str) or len(text) != 24 or not text.endswith("Z"):
        raise ValueError(f"time {text!r} is not YYYY-MM-DDTHH:MM:SS.mmmZ")
    return datetime.strptime(text[:23], "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=timezone.utc)


def _local(moment: datetime) -> str:
    return moment.astimezone(SHANGHAI).strftime("%Y-%m-%d %H:%M:%S") + " 北京时间"


def _raw_key(text: Any) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"public key {text!r} is not text")
    raw = base64.b64decode(text.strip(), validate=True)
    if len(raw) != 32:
        raise ValueError(f"public key is {len(raw)} bytes, not 32")
    return raw


def _public_key(text: str) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(_raw_key(text))


def _verify(key: Ed25519PublicKey, data: bytes, signature_b64: Any) -> bool:
    try:
        signature = base64.b64decode(str(signature_b64).strip(), validate=True)
        key.verify(signature, data)
        return True
    except (InvalidSignature, binascii.Error, ValueError, TypeError):
        return False


def _safe_path(root: Path, relative: Any) -> Optional[Path]:
    """The file a package-relative POSIX path names, or None if it would leave the package."""
    if not isinstance(relative, str) or not relative:
        return None
    pure = PurePosixPath(relative)
    if pure.is_absolute() or ".." in pure.parts or "\\" in relative:
        return None
    return root.joinpath(*pure.parts)


def hash_file(path: Path) -> Tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while True:
            block = handle.read(READ_BLOCK)
            if not block:
                break
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def _check_file(root: Path, relative: Any, size: Any, sha256: Any, what: str, problems: List[str]) -> int:
    path = _safe_path(root, relative)
    if path is None:
        problems.append(f"{what}: path {relative!r} is not a relative path inside the package")
        return 0
    if path.is_symlink():
        return 0   # reported once by the inventory: a package holds no links
    if not path.is_file():
        problems.append(f"{relative}: missing ({what})")
        return 0
    actual_sha, actual_size = hash_file(path)
    if actual_size != size:
        problems.append(f"{relative}: size {actual_size} bytes, the signed record says {size} ({what})")
    if actual_sha != sha256:
        problems.append(f"{relative}: SHA-256 {actual_sha} does not match the signed {sha256} ({what}): "
                        "the file was altered or corrupted")
    return actual_size


def _seq_ranges(seqs: List[Any]) -> str:
    """`[1, 2, 3, 7]` -> "1..3, 7" (the notation of chain holes)."""
    spans: List[List[int]] = []
    for n in sorted({s for s in seqs if isinstance(s, int)}):
        if spans and spans[-1][1] == n - 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join([str(a) if a == b else f"{a}..{b}" for a, b in spans] +
                     [repr(s) for s in seqs if not isinstance(s, int)])


def _agent_keyring(root: Path, listed: Any,
                   problems: List[str]) -> Tuple[Dict[Tuple[str, str], Optional[Ed25519PublicKey]], Set[str]]:
    """The agent keys package.json lists (`keys.agents`: {agent: [{fingerprint, public_key, valid_from,
    valid_to, retired_reason}]}), each read from keys/agents/{agent}/{fingerprint}.pub and checked: the file
    holds a key whose SHA-256 is the fingerprint and which is the listed public_key. Returns
    {(agent, fingerprint): key, or None when unusable (its problem listed)} and the key files expected."""
    ring: Dict[Tuple[str, str], Optional[Ed25519PublicKey]] = {}
    expected: Set[str] = set()
    if not isinstance(listed, dict):
        problems.append("package.json: keys.agents is not a map of agent to its keys")
        return ring, expected
    for agent, entries in listed.items():
        if not isinstance(entries, list):
            problems.append(f"package.json: keys.agents[{agent!r}] is not a list of keys")
            continue
        plain_name = bool(agent) and "/" not in agent and "\\" not in agent and agent not in (".", "..")
        for entry in entries:
            fingerprint = entry.get("fingerprint") if isinstance(entry, dict) else None
            if not isinstance(fingerprint, str) or not FINGERPRINT.fullmatch(fingerprint):
                problems.append(f"package.json: keys.agents[{agent!r}] has an entry whose fingerprint "
                                f"{fingerprint!r} is not a SHA-256 (64 lowercase hex digits)")
                continue
            rel = f"keys/agents/{agent}/{fingerprint}.pub"
            ring[(agent, fingerprint)] = None
            if not plain_name:
                problems.append(f"package.json: keys.agents names agent {agent!r}, which is not a plain folder name")
                continue
            expected.add(rel)
            usable = True
            try:
                listed_raw: Optional[bytes] = _raw_key(entry.get("public_key"))
            except ValueError as exc:
                problems.append(f"package.json: key {fingerprint} of agent {agent}: public_key is not a base64 "
                                f"Ed25519 public key ({exc})")
                listed_raw, usable = None, False
            if listed_raw is not None and hashlib.sha256(listed_raw).hexdigest() != fingerprint:
                problems.append(f"package.json: key {fingerprint} of agent {agent}: its public_key has SHA-256 "
                                f"{hashlib.sha256(listed_raw).hexdigest()}, not that fingerprint")
                usable = False
            try:
                file_raw = _raw_key((root / rel).read_text(encoding="ascii"))
            except (OSError, ValueError) as exc:   # UnicodeDecodeError and binascii.Error are ValueErrors
                problems.append(f"{rel}: missing or not a base64 Ed25519 public key ({exc})")
                continue
            actual = hashlib.sha256(file_raw).hexdigest()
            if actual != fingerprint:
                problems.append(f"{rel}: holds a key whose SHA-256 is {actual}, not {fingerprint}: the key file "
                                "was replaced or altered")
                continue
            if listed_raw is not None and file_raw != listed_raw:
                problems.append(f"{rel}: is not the public_key package.json lists for key {fingerprint} of "
                                f"agent {agent}")
                usable = False
            if usable:
                ring[(agent, fingerprint)] = Ed25519PublicKey.from_public_bytes(file_raw)
    return ring, expected


def _merge(intervals: List[Tuple[datetime, datetime]]) -> List[Tuple[datetime, datetime]]:
    merged: List[Tuple[datetime, datetime]] = []
    for start, end in sorted(intervals):
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def uncovered(window: Tuple[datetime, datetime], covered: List[Tuple[datetime, datetime]],
              tolerance: timedelta) -> List[Tuple[datetime, datetime]]:
    """Stretches of `window` not in `covered`, at least `tolerance` long (the coverage engine's rule)."""
    start, end = window
    clipped = _merge([(max(a, start), min(b, end)) for a, b in covered])
    out: List[Tuple[datetime, datetime]] = []
    cursor = start
    for a, b in clipped:
        if a > cursor:
            out.append((cursor, a))
        cursor = max(cursor, b)
    if cursor < end:
        out.append((cursor, end))
    return [(a, b) for a, b in out if b - a >= tolerance]


# ---------------------------------------------------------------------------- the checks

def _load(root: Path) -> Tuple[bytes, Dict[str, Any]]:
    package_path = root / "package.json"
    if not package_path.is_file():
        raise PackageUnreadable(f"{root} holds no package.json: give the folder (or zip) "
                                "`exam-collector export` wrote")
    data = package_path.read_bytes()
    try:
        package = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise PackageUnreadable(f"{package_path} is not valid JSON ({exc})") from exc
    if not isinstance(package, dict) or package.get("format") != PACKAGE_FORMAT:
        raise PackageUnreadable(f"{package_path} is not an exam-footage evidence package")
    return data, package


def verify_dir(root: Path, expect_key: Optional[str] = None, outside: Optional[List[str]] = None) -> Verification:
    """Verify an unpacked package. `expect_key`: the collector key's SHA-256 fingerprint (or the key itself, base64)
    that the package must be signed with; `outside`: what a zip held beside the package folder."""
    data, package = _load(root)
    problems: List[str] = []
    result = Verification(verdict=NOT_OK, problems=problems, batch=str((package.get("batch") or {}).get("id", "")))
    problems.extend(f"{name}: in the zip beside the package folder, which holds nothing else"
                    for name in outside or [])

    # 1. the collector's signature over the exact bytes of package.json
    key_text = ""
    collector_key: Optional[Ed25519PublicKey] = None
    try:
        key_text = (root / "keys" / "collector.pub").read_text(encoding="ascii").strip()
        raw_collector = _raw_key(key_text)
        collector_key = Ed25519PublicKey.from_public_bytes(raw_collector)
        result.collector_fingerprint = hashlib.sha256(raw_collector).hexdigest()
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        problems.append(f"keys/collector.pub: missing or not a base64 Ed25519 public key ({exc})")
    result.collector_key = key_text
    if expect_key is not None:
        wanted = expect_key.strip()
        if wanted in (result.collector_fingerprint, key_text) and result.collector_fingerprint:
            result.key_pinned = True
        else:
            problems.append(f"keys/collector.pub (SHA-256 {result.collector_fingerprint or '-'}) is not the collector "
                            f"key given with --expect-key ({wanted}): this package was not signed by that collector")
    try:
        signature = (root / "package.sig").read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        problems.append("package.sig: missing; the package cannot be authenticated")
        signature = None
    if collector_key is not None and signature is not None and not _verify(collector_key, data, signature):
        problems.append("package.json: the collector signature (package.sig) does not verify: package.json "
                        "was altered, or signed by another key")

    # 2-4. records, files, chains
    version = package.get("v", 1)
    keyed = isinstance(version, int) and version >= KEYED_VERSION
    agent_keys: Dict[str, Optional[Ed25519PublicKey]] = {}     # packages before v 2: one key per agent
    ring: Dict[Tuple[str, str], Optional[Ed25519PublicKey]] = {}
    expected_key_files: Set[str] = set()
    if keyed:
        ring, expected_key_files = _agent_keyring(root, (package.get("keys") or {}).get("agents"), problems)
    # (camera, agent, key, why) -> seqs of the records whose signature could not be checked
    unverifiable: Dict[Tuple[str, str, str, str], List[Any]] = {}
    tolerance = timedelta(seconds=float((package.get("coverage_rule") or {}).get("gap_tolerance_seconds", 2)))
    disqualifying = set((package.get("coverage_rule") or {}).get("disqualifying_health") or [])
    spans: Dict[Tuple[str, str], List[Tuple[datetime, datetime, str, Tuple[str, ...]]]] = {}
    listed_files = set()
    cameras = package.get("cameras")
    if not isinstance(cameras, list):
        problems.append("package.json: no `cameras` list")
        cameras = []
    for cam in cameras:
        venue, camera = str(cam.get("venue")), str(cam.get("camera"))
        label = f"{venue}/{camera}"
        records = cam.get("records") or []
        declared_holes = {(int(h["first_seq"]), int(h["last_seq"])) for h in cam.get("holes") or []}
        parsed: List[Tuple[int, Dict[str, Any], bytes]] = []
        for rec in records:
            text = rec.get("manifest")
            if not isinstance(text, str):
                problems.append(f"{label}: a record without its manifest text")
                continue
            raw = text.encode("utf-8")
            try:
                manifest = json.loads(text)
            except ValueError:
                problems.append(f"{label}: a manifest that is not JSON")
                continue
            seq = manifest.get("seq")
            where = f"{label} seq {seq}"
            agent = str(manifest.get("agent"))
            if keyed or "key" in rec:
                named = rec.get("key")
                fingerprint = str(named)
                agent_key = ring.get((agent, fingerprint))
                if not isinstance(named, str):
                    unverifiable.setdefault((label, agent, fingerprint, "unnamed"), []).append(seq)
                elif (agent, fingerprint) not in ring:
                    unverifiable.setdefault((label, agent, fingerprint, "missing"), []).append(seq)
                elif agent_key is None:
                    unverifiable.setdefault((label, agent, fingerprint, "unusable"), []).append(seq)
                elif not _verify(agent_key, raw, rec.get("signature")):
                    problems.append(f"{where}: the agent signature on the manifest does not verify with its key "
                                    f"keys/agents/{agent}/{fingerprint}.pub")
            else:  # a package before v 2: one key per agent, in keys/agents/{agent}.pub
                if agent not in agent_keys:
                    key_file = _safe_path(root, f"keys/agents/{agent}.pub")
                    try:
                        agent_keys[agent] = _public_key(key_file.read_text(encoding="ascii")) if key_file else None
                    except (OSError, ValueError, UnicodeDecodeError):
                        agent_keys[agent] = None
                    if agent_keys[agent] is None:
                        problems.append(f"keys/agents/{agent}.pub: missing or not a base64 Ed25519 public key")
                key = agent_keys[agent]
                if key is not None and not _verify(key, raw, rec.get("signature")):
                    problems.append(f"{where}: the agent signature on the manifest does not verify")
            if manifest.get("venue") != venue or manifest.get("camera") != camera:
                problems.append(f"{where}: manifest names {manifest.get('venue')}/{manifest.get('camera')}, "
                                f"listed under {label}")
            if not isinstance(seq, int):
                problems.append(f"{label}: a manifest without an integer seq")
                continue
            try:
                start, end = _parse_time(manifest.get("start")), _parse_time(manifest.get("end"))
            except ValueError as exc:
                problems.append(f"{where}: {exc}")
                continue
            if manifest.get("kind") == "segment":
                result.segments += 1
                listed_files.add(rec.get("file"))
                result.bytes += _check_file(root, rec.get("file"), manifest.get("size"), manifest.get("sha256"),
                                            f"segment {where}", problems)
                spans.setdefault((venue, camera), []).append(
                    (start, end, str(manifest.get("room")), tuple(manifest.get("health") or ())))
            parsed.append((seq, manifest, raw))
        parsed.sort(key=lambda item: item[0])
        for (seq_a, _m_a, raw_a), (seq_b, m_b, _raw_b) in zip(parsed, parsed[1:]):  # noqa: B905 - Python 3.8
            if seq_b == seq_a:
                problems.append(f"{label} seq {seq_b}: listed twice")
            elif seq_b == seq_a + 1:
                if m_b.get("prev") != hashlib.sha256(raw_a).hexdigest():
                    problems.append(f"{label} seq {seq_b}: hash chain broken, its prev is not the SHA-256 of "
                                    f"seq {seq_a}'s manifest")
            elif (seq_a + 1, seq_b - 1) not in declared_holes:
                problems.append(f"{label}: seq {seq_a + 1}..{seq_b - 1} missing from the chain and not "
                                "declared as a hole (a record was removed)")
        if parsed and parsed[0][0] == 1 and parsed[0][1].get("prev") is not None:
            problems.append(f"{label} seq 1: prev must be null")

    for (label, agent, fingerprint, why), seqs in unverifiable.items():
        if why == "unnamed":
            problems.append(f"{label} seq {_seq_ranges(seqs)}: the record names no agent key (`key`), which "
                            f"every record of a package v {version} must: the signature cannot be checked")
        elif why == "missing":
            problems.append(f"{label} seq {_seq_ranges(seqs)}: signed with key {fingerprint}, which the package "
                            f"does not carry for agent {agent} (no keys/agents/{agent}/{fingerprint}.pub listed in "
                            "package.json): the signature cannot be checked")
        else:
            problems.append(f"{label} seq {_seq_ranges(seqs)}: signed with key {fingerprint}, whose key file "
                            f"keys/agents/{agent}/{fingerprint}.pub is not usable: the signature cannot be checked")
    expected = {"package.json", "package.sig", "keys/collector.pub"} | expected_key_files
    expected |= {f"keys/agents/{agent}.pub" for agent in agent_keys}
    expected |= {str(name) for name in listed_files if isinstance(name, str)}
    expected |= {str(item.get("path")) for item in package.get("files") or [] if isinstance(item, dict)}
    problems.extend(_inventory_problems(root, expected))

    # 5. coverage recomputed from the signed manifests: no gap may be hidden
    declared: Dict[Tuple[str, str, str, str], List[Tuple[datetime, datetime]]] = {}
    for gap in package.get("gaps") or []:
        try:
            key4 = (str(gap.get("part")), str(gap.get("room")), str(gap.get("venue")), str(gap.get("camera")))
            declared.setdefault(key4, []).append((_parse_time(gap["start"]), _parse_time(gap["end"])))
        except (KeyError, ValueError) as exc:
            problems.append(f"package.json: a gap entry is malformed ({exc})")
            continue
        causes = ", ".join(gap.get("causes") or []) or "unknown"
        result.gaps.append(f"{gap.get('part')} {gap.get('venue')}/{gap.get('room')} camera "
                           f"{gap.get('camera') or '-'}: {_local(_parse_time(gap['start']))} – "
                           f"{_local(_parse_time(gap['end']))} ({gap.get('seconds')} s; {causes})")
    for part in package.get("parts") or []:
        try:
            window = (_parse_time(part["start"]), _parse_time(part["end"]))
        except (KeyError, ValueError) as exc:
            problems.append(f"package.json: a part has no valid window ({exc})")
            continue
        name, venue, room = str(part.get("part")), str(part.get("venue")), str(part.get("room"))
        part_cameras = part.get("cameras") or []
        if not part_cameras and not declared.get((name, room, venue, "")):
            problems.append(f"part {name} {venue}/{room}: no camera footage and no gap declared for it")
        for camera in part_cameras:
            usable = [(a, b) for a, b, r, health in spans.get((venue, camera), [])
                      if r == room and not disqualifying.intersection(health)]
            stated = declared.get((name, room, venue, camera), [])
            for a, b in uncovered(window, usable, tolerance):
                if not any(s <= a and b <= e for s, e in stated):
                    problems.append(f"part {name} {venue}/{room} camera {camera}: {_local(a)} – {_local(b)} "
                                    f"({(b - a).total_seconds():.1f} s) has no footage in the package and is "
                                    "not declared as a gap (a hidden gap)")

    # 6. other files the collector listed
    for item in package.get("files") or []:
        _check_file(root, item.get("path"), item.get("size"), item.get("sha256"), "listed file", problems)

    # 7. the signed audit checkpoint taken at export time
    checkpoint = (package.get("exported") or {}).get("audit_checkpoint")
    if not isinstance(checkpoint, dict):
        problems.append("package.json: no audit checkpoint: the export is not shown to be logged")
    elif collector_key is not None:
        signed = checkpoint_signed_bytes(checkpoint)
        if signed is None:
            problems.append(f"package.json: the audit checkpoint has version {checkpoint.get('version')!r}, which "
                            "this verify.py does not know (it knows 1 and 2): use the verify.py of a newer package")
        elif checkpoint.get("public_key") != key_text or not _verify(collector_key, signed,
                                                                     checkpoint.get("signature")):
            problems.append("package.json: the audit checkpoint is not signed by the collector key")

    if problems:
        result.verdict = NOT_OK
    elif result.gaps:
        result.verdict = OK_WITH_GAPS
    else:
        result.verdict = OK
    return result


def _inventory_problems(root: Path, expected: Set[str]) -> List[str]:
    """What is in the package folder beyond what it lists: unlisted files (hidden ones included), folders that
    hold no listed file, and symbolic links (never followed)."""
    folders = {PurePosixPath(name).parents[i].as_posix() for name in expected
               for i in range(len(PurePosixPath(name).parents) - 1)}
    problems: List[str] = []
    for current, dirs, files in os.walk(root, followlinks=False):
        here = Path(current)
        for name in sorted(dirs + files):
            path = here / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                problems.append(f"{rel}: a symbolic link; a package holds no links (not followed)")
            elif name in files and rel not in expected:
                kind = "a key file" if rel.startswith("keys/") else "a file"
                problems.append(f"{rel}: {kind} package.json does not list")
            elif name in dirs and rel not in folders:
                problems.append(f"{rel}/: a folder package.json lists nothing in")
        dirs[:] = [d for d in dirs if (here / d).relative_to(root).as_posix() in folders
                   and not (here / d).is_symlink()]
    return problems


def checkpoint_signed_bytes(checkpoint: Dict[str, Any]) -> Optional[bytes]:
    """The bytes an audit checkpoint signs (collector/audit.py `checkpoint_bytes`), from its JSON document.
    Packages written before checkpoint version 2 carry no `version` and the version-1 layout."""
    version = checkpoint.get("version", 1)
    fields = {"v": version, "kind": CHECKPOINT_KIND, "count": checkpoint.get("entry_count"),
              "head": checkpoint.get("head_hash"), "at": checkpoint.get("at"),
              "occasion": checkpoint.get("occasion"), "key": checkpoint.get("public_key")}
    if version == 2 and not isinstance(version, bool):
        fields.update(prev=checkpoint.get("prev_hash"), host=checkpoint.get("host"))
    elif version != 1 or isinstance(version, bool):
        return None
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def verify_package(path: Path, expect_key: Optional[str] = None) -> Verification:
    """Verify a package folder, or a zip of one (extracted to a temporary folder)."""
    path = Path(path)
    if path.is_dir():
        return verify_dir(path, expect_key)
    if path.is_file() and zipfile.is_zipfile(path):
        with tempfile.TemporaryDirectory(prefix="evidence-") as tmp:
            links: List[str] = []
            with zipfile.ZipFile(path) as archive:
                for info in archive.infolist():
                    if _safe_path(Path(tmp), info.filename) is None:
                        raise PackageUnreadable(f"{path}: zip member {info.filename!r} would leave the folder")
                    if (info.external_attr >> 16) & 0o170000 == 0o120000:
                        links.append(info.filename)
                archive.extractall(tmp)
            roots = [Path(tmp)] + sorted(p for p in Path(tmp).iterdir() if p.is_dir())
            for root in roots:
                if (root / "package.json").is_file():
                    outside = sorted(p.relative_to(tmp).as_posix() for p in Path(tmp).iterdir() if p != root)
                    result = verify_dir(root, expect_key, outside if root != Path(tmp) else [])
                    result.problems.extend(f"{name}: a symbolic link in the zip; a package holds no links"
                                           for name in links)
                    if links:
                        result.verdict = NOT_OK
                    return result
            raise PackageUnreadable(f"{path}: the zip holds no package.json")
    raise PackageUnreadable(f"{path} is neither a package folder nor a zip of one: give the folder "
                            "`exam-collector export` wrote")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="verify.py", description="Verify an exam-footage evidence package.")
    parser.add_argument("package", nargs="?", default=os.path.dirname(os.path.abspath(__file__)),
                        help="package folder or zip (default: the folder holding this verify.py)")
    parser.add_argument("--expect-key", default=None, metavar="FINGERPRINT",
                        help="the collector key's SHA-256 fingerprint (as its operator publishes it); without it the "
                             "key is only taken from the package")
    parser.add_argument("--collector-key", default=None, help=argparse.SUPPRESS)  # the earlier spelling
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    try:
        result = verify_package(Path(args.package), args.expect_key or args.collector_key)
    except PackageUnreadable as exc:
        sys.stderr.write(f"verify.py: error: {exc}\n")
        return EXIT_INPUT
    print(json.dumps(result.to_dict(), ensure_ascii=False, indent=2) if args.json else result.render())
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
