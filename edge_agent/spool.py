"""The spool: finished segments sealed into signed, hash-chained records in a durable journal.
See docs/design/durability.md (sealing order, crash recovery, the journal's invariants).

The code lives in edge_agent.journal, edge_agent.segment_files, edge_agent.probe and edge_agent.sealer; this
module names it for importers of edge_agent.spool.
"""

from exam_contract.canonical import canonical_bytes
from exam_contract.files import hash_file

from .journal import (RETRY_BASE_SECONDS, RETRY_CAP_SECONDS, SCHEMA, CameraState, CameraStatus, Journal,
                      JournalError, Record, retry_delay)
from .probe import ProbeError, ProbeResult, probe_segment
from .sealer import JournalRuns, RunInfo, Sealer
from .segment_files import (MPEG_TS_SYNC, ORPHAN_WAIT_SECONDS, SEGMENT_SUFFIX, open_by_any_process,
                            parse_final_name, parse_recording_name, read_segment_list, recording_name,
                            segment_list_name)

__all__ = ["Journal", "JournalError", "Record", "CameraState", "CameraStatus", "SCHEMA", "RETRY_BASE_SECONDS",
           "RETRY_CAP_SECONDS", "retry_delay", "Sealer", "RunInfo", "JournalRuns", "ProbeError", "ProbeResult",
           "probe_segment", "hash_file", "canonical_bytes", "SEGMENT_SUFFIX", "MPEG_TS_SYNC", "ORPHAN_WAIT_SECONDS",
           "recording_name", "segment_list_name", "parse_recording_name", "read_segment_list", "parse_final_name",
           "open_by_any_process"]
