"""`perp report` (filled by the evaluation issue)."""
