"""`perp registry {register,promote,rollback,deregister,list,show,history,verify,gc}` and `perp pull`.

`--store` defaults to `register.store` of params.yaml (./perp-store); stages and gates come from
`register.stages` and `register.gates`. Every command takes `--json` for machine-readable output on stdout.
Bad requests exit with code 2 and one line naming the problem; `verify` exits 1 when it finds a problem.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from perp.cli.app import JsonOption, ParamsOption, SetOption, app, build_config, console, emit
from perp.config import PerpConfig, dump_params
from perp.io.atomic import dumps_json

registry_app = typer.Typer(
    help="Model registry: immutable verified versions, gated promotion dev → staging → prod, audit trail.",
    no_args_is_help=True,
)
app.add_typer(registry_app, name="registry")

StoreOption = typer.Option(None, "--store", help="Store URI: a local path, file:///path or s3://bucket/prefix "
                                                 "(default: register.store of params.yaml).")


def _config(params: Optional[Path], sets: Optional[list[str]], store: Optional[str]) -> PerpConfig:
    return build_config(params, sets, **{"register.store": store})


def _print_json(value: Any) -> None:
    sys.stdout.write(dumps_json(value) + "\n")


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*["" if cell is None else str(cell) for cell in row])
    Console().print(table)


def _read_json(path: Optional[Path], what: str) -> Optional[dict[str, Any]]:
    from perp.registry import RegistryError

    if path is None:
        return None
    if not path.exists() or path.is_dir():  # not is_file(): a pipe (--metrics <(...)) is not a regular file
        raise RegistryError(f"{what} file '{path}' does not exist")
    try:
        value = json.loads(path.read_text())
    except ValueError as error:
        raise RegistryError(f"{what} file '{path}' is not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise RegistryError(f"{what} file '{path}' must hold a JSON object")
    return value


def _stages(stages: dict[str, Any]) -> str:
    return ", ".join(f"{stage}=v{version}" for stage, version in stages.items())


@registry_app.command("register")
def register_cmd(
    model_dir: Path = typer.Argument(..., help="Hugging Face checkpoint directory to register."),
    name: Optional[str] = typer.Option(None, "--name", "-n", help="Model name (default: register.name)."),
    metrics: Optional[Path] = typer.Option(None, "--metrics", help="metrics.json (default: MODEL_DIR/metrics.json)."),
    lineage: Optional[Path] = typer.Option(None, "--lineage", help="JSON lineage: base_model, data hashes, configs."),
    dense: bool = typer.Option(False, "--dense", help="Store safetensors as they are, not in the compact format."),
    store: Optional[str] = StoreOption,
    params: Optional[Path] = ParamsOption,
    sets: Optional[list[str]] = SetOption,
    as_json: bool = JsonOption,
) -> None:
    """Register MODEL_DIR as the next immutable version of NAME (files, params, metrics, lineage, provenance)."""
    config = build_config(params, sets, **{"register.store": store, "register.name": name})
    from perp.registry import register_version

    manifest = register_version(config.register.store, config.register.name, model_dir,
                                _read_json(metrics, "metrics"), dump_params(config), _read_json(lineage, "lineage"),
                                compact=not dense)
    if as_json:
        _print_json(manifest)
        return
    emit({"name": manifest["name"], "version": manifest["version"], "files": len(manifest["files"]),
          "bytes": manifest["bytes"], "stored_bytes": manifest["stored_bytes"],
          "manifest_sha256": manifest["manifest_sha256"], "event": manifest["event"]["seq"]}, False, "registered")


@registry_app.command("promote")
def promote_cmd(
    name: str = typer.Argument(..., help="Model name."),
    version: str = typer.Argument(..., help="Version number."),
    to: str = typer.Option(..., "--to", help="Target stage (register.stages)."),
    reason: Optional[str] = typer.Option(None, "--reason", help="Why (required with --force)."),
    force: bool = typer.Option(False, "--force", help="Promote despite failed gates (recorded, needs --reason)."),
    store: Optional[str] = StoreOption,
    params: Optional[Path] = ParamsOption,
    sets: Optional[list[str]] = SetOption,
    as_json: bool = JsonOption,
) -> None:
    """Put VERSION of NAME in a stage, if it passes that stage's gates."""
    config = _config(params, sets, store)
    from perp.registry import GateRefused, promote

    try:
        result = promote(config.register.store, name, version, to, reason=reason, force=force,
                         gates=config.register.gates, stages=config.register.stages)
    except GateRefused as refusal:
        if as_json:
            _print_json({"ok": False, "promoted": False, "error": str(refusal), "gates": refusal.evaluation})
        raise
    if as_json:
        _print_json({"ok": True, "promoted": True, **result})
        return
    emit({"name": name, "version": result["version"], "stage": result["stage"],
          "previous_version": result["previous_version"], "forced": result["forced"],
          "failed_gates": ", ".join(result["failed_gates"]) or "none", "event": result["event"]["seq"]},
         False, "promoted")
    if result["forced"]:
        console.print(f"[bold yellow]forced:[/] recorded with failed gates {', '.join(result['failed_gates'])}")


@registry_app.command("rollback")
def rollback_cmd(
    name: str = typer.Argument(..., help="Model name."),
    stage: str = typer.Option("prod", "--stage", help="Stage to roll back."),
    reason: Optional[str] = typer.Option(None, "--reason", help="Why (required)."),
    store: Optional[str] = StoreOption,
    params: Optional[Path] = ParamsOption,
    sets: Optional[list[str]] = SetOption,
    as_json: bool = JsonOption,
) -> None:
    """Put STAGE back on the version it held before its current one."""
    config = _config(params, sets, store)
    from perp.registry import rollback

    result = rollback(config.register.store, name, stage, reason=reason, stages=config.register.stages)
    if as_json:
        _print_json(result)
        return
    now = result["version"] if result["version"] is not None else "none (the stage is empty)"
    emit({"name": name, "stage": stage, "version": now, "rolled_back": result["previous_version"],
          "event": result["event"]["seq"]}, False, "rolled back")


@registry_app.command("deregister")
def deregister_cmd(
    name: str = typer.Argument(..., help="Model name."),
    version: str = typer.Argument(..., help="Version number."),
    reason: Optional[str] = typer.Option(None, "--reason", help="Why (required)."),
    store: Optional[str] = StoreOption,
    params: Optional[Path] = ParamsOption,
    sets: Optional[list[str]] = SetOption,
    as_json: bool = JsonOption,
) -> None:
    """Withdraw a version (no longer promotable or pullable; its record stays)."""
    config = _config(params, sets, store)
    from perp.registry import deregister

    result = deregister(config.register.store, name, version, reason=reason)
    if as_json:
        _print_json(result)
        return
    emit({"name": name, "version": result["version"], "event": result["event"]["seq"]}, False, "deregistered")


@registry_app.command("list")
def list_cmd(
    store: Optional[str] = StoreOption,
    params: Optional[Path] = ParamsOption,
    sets: Optional[list[str]] = SetOption,
    as_json: bool = JsonOption,
) -> None:
    """Models in the store, their versions and what each stage holds."""
    config = _config(params, sets, store)
    from perp.registry import list_models

    models = list_models(config.register.store)
    if as_json:
        _print_json({"store": config.register.store, "models": models})
        return
    _table(f"models in {config.register.store}", ["name", "versions", "latest", "stages", "events", "updated"],
           [[m["name"], m.get("versions"), m.get("latest"), _stages(m.get("stages", {})) or m.get("integrity_error"),
             m.get("events"), m.get("updated")] for m in models])


@registry_app.command("show")
def show_cmd(
    name: str = typer.Argument(..., help="Model name."),
    version: Optional[str] = typer.Argument(None, help="A version number, a stage or 'latest' (default: summary)."),
    store: Optional[str] = StoreOption,
    params: Optional[Path] = ParamsOption,
    sets: Optional[list[str]] = SetOption,
    as_json: bool = JsonOption,
) -> None:
    """A model's versions and stages, or one version's manifest."""
    config = _config(params, sets, store)
    from perp.registry import show

    result = show(config.register.store, name, version)
    if as_json:
        _print_json(result)
        return
    if version is None:
        _table(f"{name}: {_stages(result['stages']) or 'no stage'}", ["version", "registered", "by", "stages", "state"],
               [[v["version"], v["when"], f"{v['who'].get('user')}@{v['who'].get('host')}", ", ".join(v["stages"]),
                 "deregistered" if v["deregistered"] else "active"] for v in result["versions"]])
        return
    summary = {key: result.get(key) for key in ("name", "version", "stages", "deregistered", "bytes", "stored_bytes",
                                                "manifest_sha256", "when", "who", "code", "lineage",
                                                "dvc_outs", "prefect_flow_run_id")}
    summary["files"] = {rel: f"{info['size']} B sha256:{info['sha256'][:16]}" for rel, info in result["files"].items()}
    summary["gate_metrics"] = (result.get("metrics") or {}).get("gates")
    emit(summary, False, f"{name} v{result['version']}")


@registry_app.command("history")
def history_cmd(
    name: str = typer.Argument(..., help="Model name."),
    stage: Optional[str] = typer.Option(None, "--stage", help="Only events for this stage."),
    version: Optional[str] = typer.Option(None, "--version", help="Only events about this version."),
    store: Optional[str] = StoreOption,
    params: Optional[Path] = ParamsOption,
    sets: Optional[list[str]] = SetOption,
    as_json: bool = JsonOption,
) -> None:
    """The audit trail: who registered, promoted, rolled back or deregistered what, when and why."""
    config = _config(params, sets, store)
    from perp.registry import history

    events = history(config.register.store, name, stage=stage, version=version)
    if as_json:
        _print_json({"name": name, "events": events})
        return
    rows = []
    for e in events:
        kind = "forced promote" if e.get("forced") else e["type"]
        detail = e.get("reason", "")
        if e.get("failed_gates"):
            detail = f"{detail} [failed: {', '.join(e['failed_gates'])}]".strip()
        rows.append([e["seq"], e["when"], f"{e['who'].get('user')}@{e['who'].get('host')}", kind, e.get("version"),
                     e.get("stage"), e.get("previous_version"), detail])
    _table(f"history of {name}", ["seq", "when", "who", "event", "version", "stage", "previous", "reason"], rows)


@registry_app.command("verify")
def verify_cmd(
    name: Optional[str] = typer.Option(None, "--name", "-n", help="Only this model (default: every model)."),
    quick: bool = typer.Option(False, "--quick", help="Check blobs' presence and size only, not their sha256."),
    anchor: Optional[list[str]] = typer.Option(None, "--anchor", help="An event hash recorded elsewhere (e.g. a head "
                                                                     "hash kept in git) that must still be in the log; "
                                                                     "repeatable."),
    store: Optional[str] = StoreOption,
    params: Optional[Path] = ParamsOption,
    sets: Optional[list[str]] = SetOption,
    as_json: bool = JsonOption,
) -> None:
    """Recompute every event chain, manifest hash and file hash; exit 1 naming what was altered."""
    config = _config(params, sets, store)
    from perp.registry import verify

    report = verify(config.register.store, name=name, deep=not quick, anchors=anchor)
    if as_json:
        _print_json(report)
    else:
        checked = report["checked"]
        summary = (f"{len(report['models'])} model(s), {checked['events']} events, {checked['manifests']} manifests, "
                   f"{checked['blobs']} blobs ({checked['bytes']} bytes hashed)")
        if report["ok"]:
            console.print(f"[bold green]ok:[/] {summary}; chains intact", highlight=False, soft_wrap=True)
            for model, info in report["models"].items():  # anchors for a later `verify --anchor`
                console.print(f"  {model}: head event {info['events']} hash {info['head_hash']}", highlight=False,
                              soft_wrap=True)
    for problem in report["problems"]:
        console.print(f"[bold red]problem:[/] {problem['message']}", highlight=False, soft_wrap=True)
    if not report["ok"]:
        raise SystemExit(1)  # not typer.Exit: perp's main runs click in non-standalone mode


@registry_app.command("gc")
def gc_cmd(
    older_than: str = typer.Option("24h", "--older-than", help="Grace period: only orphans older than this are "
                                                              "deleted (90s, 30m, 24h, 7d). It protects "
                                                              "registrations in progress."),
    delete: bool = typer.Option(False, "--delete", help="Delete them (default: a dry run that only reports)."),
    store: Optional[str] = StoreOption,
    params: Optional[Path] = ParamsOption,
    sets: Optional[list[str]] = SetOption,
    as_json: bool = JsonOption,
) -> None:
    """Find (and with --delete, remove) blobs no version names: what failed or killed registrations left."""
    from perp.registry import RegistryError, gc
    from perp.registry.names import parse_duration

    try:
        grace = parse_duration(older_than)
    except RegistryError as error:
        raise RegistryError(f"--older-than: {error}") from None
    config = _config(params, sets, store)
    report = gc(config.register.store, older_than_seconds=grace, dry_run=not delete)
    if as_json:
        _print_json(report)
        return
    emit({key: report[key] for key in ("store", "older_than_seconds", "models", "manifests", "scanned",
                                       "scanned_bytes", "referenced", "orphaned", "orphaned_bytes", "kept_young")}
         | {"would delete" if not delete else "deleted": report["deleted"],
            "bytes to reclaim" if not delete else "bytes reclaimed": report["bytes_reclaimed"],
            "unfinished uploads": report["stale_uploads"],
            "unfinished uploads to remove" if not delete else "unfinished uploads removed":
                report["stale_uploads_removed"]},
         False, "gc (dry run)" if not delete else "gc")
    for name in report["stale_upload_names"][:20]:
        console.print(f"  {'would remove' if not delete else 'removed'} unfinished upload {name}", highlight=False,
                      soft_wrap=True)
    shown = report["deleted_keys"][:20]
    for key in shown:
        console.print(f"  {'would delete' if not delete else 'deleted'} {key}", highlight=False, soft_wrap=True)
    if len(report["deleted_keys"]) > len(shown):
        console.print(f"  ... and {len(report['deleted_keys']) - len(shown)} more (--json lists them all)",
                      highlight=False)
    if not delete and report["deleted"]:
        console.print(f"dry run: nothing deleted; run again with --delete to delete {report['deleted']} orphan "
                      f"blob(s), {report['bytes_reclaimed']} bytes", highlight=False, soft_wrap=True)


@app.command("pull")
def pull_cmd(
    ref: str = typer.Argument(..., help="NAME@STAGE, NAME@VERSION or NAME@latest."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (a plain Hugging Face checkpoint)."),
    store: Optional[str] = StoreOption,
    params: Optional[Path] = ParamsOption,
    sets: Optional[list[str]] = SetOption,
    as_json: bool = JsonOption,
) -> None:
    """Download a registered model, verified file by file, as a dense Hugging Face checkpoint."""
    config = _config(params, sets, store)
    from perp.registry import pull

    result = pull(config.register.store, ref, out)
    emit(result, as_json, title="pulled")
