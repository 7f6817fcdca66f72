"""Exit codes of exam-edge, exam-collector and exam-retention (README.md, The three commands: every failure is one
line on stderr and one of these codes), so that scripts and systemd units can tell the cases apart.

The standalone evidence checker (`collector/evidence_verify.py`, shipped as `verify.py` in every package)
uses the same numbers for its verdicts but cannot import this package.
"""

OK = 0
"""Done; for reports: nothing to flag."""

INPUT = 1
"""Bad input: an option, the config, a key or a file the command was given; the message says what to fix."""

UNREACHABLE = 2
"""A service the command needs (the MQTT broker, the database) cannot be reached; the message names it."""

GAPS = 3
"""The footage is intact but its coverage has gaps (a batch report, an audit, a package OK_WITH_GAPS)."""

INTEGRITY = 4
"""Stored or exported footage, or the audit log, failed verification (hashes, signatures, chains)."""
