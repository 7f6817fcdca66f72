"""Exam batches (批次): import from the exam-affairs system, link footage, report coverage.

Import (`import_batches`) is all-or-nothing: every row is checked first and all problems are raised together
as one `BatchImportError`; only a clean file touches the database, in one transaction.

Linking is a query, not a table: a part's footage is every record of a camera seen in the part's venue and
room that overlaps `[start - pre_margin, end + post_margin]`. Whichever arrives first, batch or footage, the
answer is the same at the time it is asked, and there is no link table to go stale.

The code is in three modules, all re-exported here: collector/batch_parse.py reads and validates a batch file,
collector/batch_import.py writes it in one transaction, collector/batch_coverage.py links footage and reports
coverage (rendered as text by collector/batch_view.py).
"""

from __future__ import annotations

from .batch_coverage import (RECORD_SLACK, STAGING_FRESH_SECONDS, BatchNotFound, BatchReport, BatchSummary,
                             PartReport, all_cameras, audit_period, batch_report, camera_input, linked_records,
                             list_batches, parts_linked_to, report_json, room_cameras)
from .batch_import import BatchChange, FieldChange, ImportResult, import_batches, import_file
from .batch_parse import (COLUMNS, MAX_PART_HOURS, PARTS, RESAVE_ADVICE, SHANGHAI, BatchImportError, PartRow, RowError,
                          decode_text, parse_exam_time, parse_rows, validate_rows)
from .coverage import STATUS_COMPLETE, STATUS_GAPS, STATUS_NO_FOOTAGE, STATUS_PENDING

__all__ = ["COLUMNS", "MAX_PART_HOURS", "PARTS", "RESAVE_ADVICE", "SHANGHAI", "BatchImportError", "PartRow", "RowError",
           "decode_text", "parse_exam_time", "parse_rows", "validate_rows",
           "BatchChange", "FieldChange", "ImportResult", "import_batches", "import_file",
           "RECORD_SLACK", "STAGING_FRESH_SECONDS", "BatchNotFound", "BatchReport", "BatchSummary", "PartReport",
           "all_cameras", "audit_period", "batch_report", "camera_input", "linked_records", "list_batches",
           "parts_linked_to", "report_json", "room_cameras",
           "STATUS_COMPLETE", "STATUS_GAPS", "STATUS_NO_FOOTAGE", "STATUS_PENDING"]
