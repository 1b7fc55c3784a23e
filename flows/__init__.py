"""Prefect flows: `compress` (the chain), `promote` (gated promotion) and `sweep` (a grid fanned out)."""
