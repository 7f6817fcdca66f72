"""The spool: finished segments sealed into signed, hash-chained records in a durable journal.

Sealing order (edge_agent.sealer), safe across SIGKILL at any point:
1. probe and hash the file where ffmpeg left it (recording/),
2. build and sign the manifest (seq = last + 1, prev = last record hash),
3. one transaction (synchronous=FULL): insert the record with its source and final paths, bump the camera,
4. rename the file into spool/{camera}/ under its final name, fsync the directory, mark it moved.
A crash after 3 leaves a journaled record whose file is still in recording/: `Sealer.recover()` finishes the move.
A crash before 3 leaves an unjournaled file in recording/: it is sealed again at restart (same seq).
The design and its reasons: docs/design/durability.md.

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
