"""The tamper-evident audit log (PRODUCT.md, Audit log; Article 29 全程留痕、责任可追溯).

Every entry carries the hash of the previous one:

    entry_hash = sha256(canonical_bytes({"v": 1, "seq", "at", "actor", "action", "target",
                                         "reason", "detail", "prev"}))

with `at` in the manifest time format and `detail` a JSON object. Appends are serialized by locking
the single `audit_head` row (`SELECT ... FOR UPDATE` on PostgreSQL; on SQLite a no-op UPDATE of that
row takes the database write lock first), so two collectors never give out the same seq or fork the
chain. An entry is part of its caller's transaction: it commits or rolls back with what it records.

Checkpoints sign (entry count, head hash, time) with the collector's Ed25519 key, so that deleting
the newest entries (which leaves a valid, shorter chain) is detected too. Version-2 checkpoints also sign
the SHA-256 of the previous checkpoint's signed bytes and the signing host, so checkpoints form a chain of
their own: deleting one (say the newest, to rewrite the entries after the one before) breaks that chain
or leaves the newest remaining checkpoint too old for the entries after it (`verify_log(now=...,
max_age=...)`). Copies of checkpoints held elsewhere (published on MQTT, cited in evidence packages) are
compared with the database by `verify_log(copies=...)`.

The code is in three modules, all re-exported here: collector/audit_entries.py appends entries (`record`) and
names the actions; collector/audit_checkpoints.py signs, publishes and parses checkpoints and rotates the
collector key; collector/audit_verify.py verifies the whole log (`verify_log`).
"""

from __future__ import annotations

from .audit_checkpoints import (CHECKPOINT_INTERVAL_SECONDS, CHECKPOINT_KIND, CHECKPOINT_TOPIC, CHECKPOINT_VERSION,
                                OCCASION_KEY_HANDOVER, OCCASION_KEY_ROTATION, CheckpointCopy, CheckpointCopyError,
                                CheckpointLoop, check_copy_signature, checkpoint, checkpoint_after_command,
                                checkpoint_bytes, checkpoint_copy_from, checkpoint_document, checkpoint_for_export,
                                checkpoint_hash_of, checkpoint_if_changed, checkpoint_payload, load_checkpoint_copy,
                                newest_checkpoint, retired_by_rotation, rotate_collector_key, signed_bytes_of)
from .audit_entries import (ACTION_AUDIT_REPORT, ACTION_BATCH_IMPORT, ACTION_CHAIN_HEADS, ACTION_ENFORCE_RUN,
                            ACTION_ENROLL, ACTION_FOOTAGE_EXPORT, ACTION_FOOTAGE_VIEW, ACTION_HOLD_ADD,
                            ACTION_HOLD_RELEASE, ACTION_INGEST_REJECT, ACTION_KEY_ROTATE, ACTION_SCRUB_RUN,
                            ACTION_SEGMENT_DELETE, ENTRY_VERSION, AuditError, entries_for, entry_hash_of,
                            entry_payload, local_actor, parse_detail, record)
from .audit_verify import DEFAULT_MAX_AGE, LogProblem, LogReport, trusted_collector_keys, verify_log
from .models import AuditCheckpoint, AuditEntry, AuditHead

__all__ = ["record", "checkpoint", "checkpoint_for_export", "checkpoint_if_changed", "checkpoint_after_command",
           "checkpoint_document", "checkpoint_payload", "load_checkpoint_copy", "check_copy_signature",
           "CheckpointCopy", "CheckpointCopyError", "verify_log", "LogReport", "LogProblem", "AuditError",
           "CheckpointLoop", "local_actor",
           # also re-exported from the modules above, for the call sites that name them through this one
           "ACTION_AUDIT_REPORT", "ACTION_BATCH_IMPORT", "ACTION_CHAIN_HEADS", "ACTION_ENFORCE_RUN", "ACTION_ENROLL",
           "ACTION_FOOTAGE_EXPORT", "ACTION_FOOTAGE_VIEW", "ACTION_HOLD_ADD", "ACTION_HOLD_RELEASE",
           "ACTION_INGEST_REJECT", "ACTION_KEY_ROTATE", "ACTION_SCRUB_RUN", "ACTION_SEGMENT_DELETE", "ENTRY_VERSION",
           "entries_for", "entry_hash_of", "entry_payload", "parse_detail",
           "CHECKPOINT_INTERVAL_SECONDS", "CHECKPOINT_KIND", "CHECKPOINT_TOPIC", "CHECKPOINT_VERSION",
           "OCCASION_KEY_HANDOVER", "OCCASION_KEY_ROTATION", "checkpoint_bytes", "checkpoint_copy_from",
           "checkpoint_hash_of", "newest_checkpoint", "retired_by_rotation", "rotate_collector_key", "signed_bytes_of",
           "DEFAULT_MAX_AGE", "trusted_collector_keys", "AuditCheckpoint", "AuditEntry", "AuditHead"]
