"""`perp registry ...` and `perp pull` (filled by the registry issue)."""
