"""Model registry: immutable verified versions, gated promotion dev → staging → prod, tamper-evident audit trail.

    from perp.registry import register_version, promote, rollback, pull, verify, gc

    manifest = register_version("s3://bucket/registry", "smollm2-perp", Path("out/recovered"), metrics, params, lineage)
    same = find_version("s3://bucket/registry", "smollm2-perp", Path("out/recovered"), metrics, params, lineage)
    promote("s3://bucket/registry", "smollm2-perp", manifest["version"], "dev", reason="nightly")
    pull("s3://bucket/registry", "smollm2-perp@prod", "deploy/model")
    gc("s3://bucket/registry", older_than_seconds=86400, dry_run=False)   # orphans of failed registrations

Modules: `api` (operations), `events` (hash-chained log, concurrency), `gates` (metrics.json shape, gates),
`names` (validation), `provenance` (who/when/code, secret scrubbing).

Heavy modules load on first use. (The name → class registry of pruning and recovery methods is
`perp.plugins.Registry`, unrelated to this one.)
"""

from __future__ import annotations

from typing import Any

from perp.registry.names import RegistryError  # noqa: F401 - re-exported: perp.registry.RegistryError

_API = {
    "register_version", "find_version", "promote", "rollback", "deregister", "list_models", "show", "history",
    "verify", "pull", "gc", "GateRefused",
}
_EVENTS = {"RegistryIntegrityError", "RegistryConflict"}


def __getattr__(attribute: str) -> Any:
    if attribute in _API:
        from perp.registry import api

        return getattr(api, attribute)
    if attribute in _EVENTS:
        from perp.registry import events

        return getattr(events, attribute)
    raise AttributeError(f"module 'perp.registry' has no attribute '{attribute}'")


__all__ = sorted({"RegistryError"} | _API | _EVENTS)
