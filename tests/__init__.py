"""Tests of localrefine (run with pytest; Scipion's runner finds the protocol tests)."""
