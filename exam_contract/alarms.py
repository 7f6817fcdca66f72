"""Alarm codes: conditions that stop footage from getting through until someone or time cures them.

The edge agent reports its alarms in its retained status topic (`alarms`: code -> detail) and `exam-edge
status`; the collector logs its own (`ALARM code: ...`) and records them as `alarm` / `alarm_cleared` ingest
events. A `str` enum: JSON, topics, the database and logs carry the plain value.
"""

from enum import StrEnum


class AlarmCode(StrEnum):
    # edge agent
    DISK_FULL = "disk_full"                        # data_dir nearly full of unacknowledged footage: cameras held
    RECORDS_REJECTED = "records_rejected"          # the journal holds records the collector rejected
    # collector ingest
    STORAGE_FULL = "storage_full"                  # no space on storage_dir: no `stored` replies
    STORAGE_ERROR = "storage_error"                # storage_dir fails otherwise (mount, permissions, I/O)
    DATABASE_UNREACHABLE = "database_unreachable"  # the database does not answer
    OBJECT_LOCK_FAILED = "object_lock_failed"      # the object storage did not take a legal hold or lock extension
    OBJECT_LOCKED = "object_locked"                # the object storage refused a deletion enforce planned: still locked
