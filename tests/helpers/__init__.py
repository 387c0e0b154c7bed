"""Small importable helpers for the tests (a user's scoring functions)."""
