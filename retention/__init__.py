"""Retention job: one-year floor, legal holds, integrity scrub, coverage audit (issue 5)."""
