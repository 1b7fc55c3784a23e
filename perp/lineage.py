"""Lineage: which stage outputs a model descends from, proven from the reports each output carries.

A recovered model's recover_report.json names its input and that input's content sha256; a pruned model's
prune_report.json names its base model and calibration tokens. Registration records the chain (`lineage`) only
after checking it (`check_lineage`); evaluation follows the same records to the dense baseline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Optional

from perp.errors import PerpError
from perp.io.atomic import read_json
from perp.layout import PRUNE_REPORT, RECOVER_REPORT, Ref


class LineageError(PerpError):
    """The stage outputs named for a registration are not one chain (calibration → pruned → model)."""


MAX_RECOVERY_CHAIN = 8


def is_prune_output(directory: Path) -> bool:
    """A mask stage output, or recovery fused with pruning (it holds both reports)."""
    return (Path(directory) / PRUNE_REPORT).is_file()


def _content_hash(directory: Path) -> str:
    from perp.models.loading import model_content_hash

    return model_content_hash(directory)


class RecoveryInput(NamedTuple):
    """The input a recover_report.json names: its spec as recorded, the content sha256 it had (None in reports
    that predate the record), and its local directory while it still holds that content (else None)."""

    source: str
    sha256: Optional[str]
    path: Optional[Path]


def recovery_input(report: dict[str, Any]) -> Optional[RecoveryInput]:
    """What a recover report says the model was recovered from; None when it names no input."""
    source, digest = report.get("model"), report.get("model_sha256")
    if not isinstance(source, str) or not source:
        return None
    digest = digest if isinstance(digest, str) else None
    path = Path(source).expanduser()
    if not path.is_dir() or (digest is not None and _content_hash(path) != digest):
        return RecoveryInput(source, digest, None)
    return RecoveryInput(source, digest, path)


def recovered_from(model_dir: Path) -> list[RecoveryInput]:
    """What recover_report.json says the model was recovered from, nearest first: (source as recorded, its
    content sha256, the local directory when it still exists with that content). A recovered input (recovery of
    a recovered model) is followed to its own input; a prune output ends the chain."""
    chain: list[RecoveryInput] = []
    current = Path(model_dir)
    while len(chain) < MAX_RECOVERY_CHAIN and not is_prune_output(current):
        recorded = recovery_input(read_json(current / RECOVER_REPORT))
        if recorded is None or recorded.sha256 is None:
            break
        chain.append(recorded)
        if recorded.path is None:
            break
        current = recorded.path
    return chain


def find_pruned_input(model_dir: Path) -> Optional[Path]:
    """The prune output `model_dir` descends from, where that is provable from its reports: itself when it is
    one, else the recorded input of its recovery when it still exists with the recorded content."""
    if is_prune_output(model_dir):
        return Path(model_dir)
    chain = recovered_from(model_dir)
    last = chain[-1][2] if chain else None
    return last if last is not None and is_prune_output(last) else None


def check_lineage(calibration: Optional[Ref], pruned: Optional[Ref], candidate: Ref) -> None:
    """Refuse references that do not descend from one another, so a manifest never records false lineage:
    the model must come from `pruned` (recover_report.json's `model_sha256`, or the same content when the model
    is itself a prune output), and `pruned` must have been pruned with `calibration`'s tokens."""
    model_dir = Path(candidate["uri"])
    if pruned is not None:
        _check_pruned_input(model_dir, Path(pruned["uri"]))
    if calibration is not None:
        _check_calibration(calibration, pruned, model_dir)


def _check_pruned_input(model_dir: Path, pruned_dir: Path) -> None:
    if is_prune_output(model_dir):
        if model_dir.resolve() != pruned_dir.resolve() and _content_hash(model_dir) != _content_hash(pruned_dir):
            raise LineageError(f"'{model_dir}' is itself a prune output and '{pruned_dir}' is another one; pass "
                               f"--pruned '{model_dir}' (or leave --pruned out)")
        return
    pruned_hash = _content_hash(pruned_dir)
    chain = recovered_from(model_dir)
    if chain and pruned_hash not in {digest for _, digest, _ in chain}:
        source, digest, reachable = chain[-1]
        assert digest is not None  # recovered_from keeps only inputs with a recorded sha256
        recorded = (read_json(model_dir / RECOVER_REPORT).get("pruning") or {}).get("source")
        if reachable is None and recorded and Path(recorded).resolve() == pruned_dir.resolve():
            raise LineageError(f"cannot verify that '{model_dir}' descends from '{pruned_dir}': the recovery it "
                               f"records ran on '{source}', which is gone or changed, so the chain cannot be "
                               "followed; restore that directory, or leave --pruned out (the recorded hashes are "
                               "kept)")
        raise LineageError(f"'{model_dir}' was not recovered from '{pruned_dir}' (sha256 {pruned_hash[:12]}…): "
                           f"{RECOVER_REPORT} records the input '{source}' (sha256 {digest[:12]}…); pass --pruned "
                           "with the directory it was recovered from")


def _check_calibration(calibration: Ref, pruned: Optional[Ref], model_dir: Path) -> None:
    used, where = _recorded_calibration(pruned, model_dir)
    if used is None:
        raise LineageError(f"cannot tie the calibration set '{calibration['uri']}' to '{model_dir}': no prune report "
                           "names the calibration tokens it used; pass --pruned with its prune output")
    if calibration.get("tokens_sha256") != used:
        raise LineageError(f"the calibration set '{calibration['uri']}' (tokens sha256 "
                           f"{str(calibration.get('tokens_sha256'))[:12]}…) is not the one {where} was pruned with "
                           f"(sha256 {used[:12]}…); pass --calibration with the calibration stage output it used")


def _recorded_calibration(pruned: Optional[Ref], model_dir: Path) -> tuple[Optional[str], str]:
    """The calibration tokens sha256 the pruning recorded, and whose record it is (for messages)."""
    if pruned is not None:
        return (read_json(Path(pruned["uri"]) / PRUNE_REPORT).get("calibration") or {}).get("sha256"), \
            f"'{pruned['uri']}'"
    if is_prune_output(model_dir):
        return (read_json(model_dir / PRUNE_REPORT).get("calibration") or {}).get("sha256"), f"'{model_dir}'"
    return (read_json(model_dir / RECOVER_REPORT).get("pruning") or {}).get("calibration_sha256"), \
        f"the pruned input of '{model_dir}'"


def lineage(calibration: Optional[Ref], pruned: Optional[Ref], recovered: Ref) -> dict[str, Any]:
    """What a registered version records about how it was made, from the stage outputs' own reports.

    `calibration` and `pruned` may be None when unknown: the values then come from the records the model
    directory carries (recover_report.json's `pruning`), and what no report says stays None. Raises
    `LineageError` when the references are not one chain (`check_lineage`)."""
    check_lineage(calibration, pruned, recovered)
    prune_report = read_json(Path(pruned["report"])) if pruned and pruned.get("report") else {}
    recover_report = read_json(Path(recovered["report"])) if recovered.get("report") else {}
    recorded = recover_report.get("pruning")
    recorded = recorded if isinstance(recorded, dict) else {}
    calibration_sha256 = ((calibration or {}).get("tokens_sha256")
                          or (prune_report.get("calibration") or {}).get("sha256")
                          or recorded.get("calibration_sha256"))
    return {
        "base_model": prune_report.get("base_model") or recorded.get("base_model"),
        "calibration_sha256": calibration_sha256,
        "training_data_sha256": recover_report.get("data_sha256"),
        "prune": (prune_report.get("config") or {}).get("prune"),
        "recover": (recover_report.get("config") or {}).get("recover"),
        "artifacts": {"calibration": calibration, "pruned": pruned, "recovered": recovered},
    }
