"""`python -m demo`: a whole pipeline on one machine, from two synthetic cameras to verified storage."""
