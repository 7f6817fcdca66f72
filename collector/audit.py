"""The tamper-evident audit log (Article 29 全程留痕、责任可追溯): hash-chained entries, signed and chained
checkpoints, copies held elsewhere. See docs/design/retention.md; the formats are in docs/retention.md.

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
                            ACTION_HOLD_RELEASE, ACTION_INGEST_REJECT, ACTION_KEY_ROTATE, ACTION_LEGAL_HOLD,
                            ACTION_LOCK_EXTEND, ACTION_SCRUB_RUN, ACTION_SEGMENT_ADOPT, ACTION_SEGMENT_DELETE,
                            ENTRY_VERSION, AuditError, entries_for, entry_hash_of,
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
           "ACTION_INGEST_REJECT", "ACTION_KEY_ROTATE", "ACTION_LEGAL_HOLD", "ACTION_LOCK_EXTEND", "ACTION_SCRUB_RUN",
           "ACTION_SEGMENT_ADOPT", "ACTION_SEGMENT_DELETE", "ENTRY_VERSION",
           "entries_for", "entry_hash_of", "entry_payload", "parse_detail",
           "CHECKPOINT_INTERVAL_SECONDS", "CHECKPOINT_KIND", "CHECKPOINT_TOPIC", "CHECKPOINT_VERSION",
           "OCCASION_KEY_HANDOVER", "OCCASION_KEY_ROTATION", "checkpoint_bytes", "checkpoint_copy_from",
           "checkpoint_hash_of", "newest_checkpoint", "retired_by_rotation", "rotate_collector_key", "signed_bytes_of",
           "DEFAULT_MAX_AGE", "trusted_collector_keys", "AuditCheckpoint", "AuditEntry", "AuditHead"]
