"""Validation of model names, versions, stages, `NAME@STAGE|NAME@VERSION` references and durations (``24h``).

Names and stages become store keys, so they are checked before anything touches the store: no path separators,
no '..', no leading '.' or '-', bounded length. Stages must start with a letter, so `NAME@3` (a version) and
`NAME@prod` (a stage) can never be confused; `latest` is reserved.
"""

from __future__ import annotations

import re
from typing import Optional, Union

from perp.errors import PerpError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_STAGE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
_VERSION = re.compile(r"^[vV]?([0-9]{1,9})$")
LATEST = "latest"
_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([smhd])$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class RegistryError(PerpError):
    """A registry request is invalid or cannot be honoured (unknown version or stage, refused gate...)."""


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        shown = name if isinstance(name, str) and len(name) <= 160 else f"{str(name)[:160]}..."
        raise RegistryError(f"'{shown}' is not a valid model name (letters, digits, '.', '_', '-'; starting with "
                            "a letter or digit; at most 128 characters; no '..')")
    return name


def validate_stage(stage: str, stages: Optional[list[str]] = None) -> str:
    if not isinstance(stage, str) or not _STAGE.match(stage) or stage == LATEST:
        raise RegistryError(f"'{str(stage)[:80]}' is not a valid stage name (a letter, then letters, digits, "
                            "'_' or '-'; at most 64; not 'latest')")
    if stages is not None and stage not in stages:
        raise RegistryError(f"unknown stage '{stage}' (allowed: {', '.join(stages)})")
    return stage


def validate_stages(stages: list[str]) -> list[str]:
    if not stages or len(set(stages)) != len(stages):
        raise RegistryError(f"stages must be a non-empty list of distinct names, got {stages}")
    return [validate_stage(stage) for stage in stages]


def validate_version(version: Union[int, str]) -> int:
    if isinstance(version, bool):
        raise RegistryError(f"'{version}' is not a version number")
    if isinstance(version, int):
        number = version
    else:
        match = _VERSION.match(str(version).strip())
        if not match:
            raise RegistryError(f"'{str(version)[:40]}' is not a version number (a positive integer such as 3)")
        number = int(match.group(1))
    if not 1 <= number <= 999_999_999:
        raise RegistryError(f"version {number} is out of range (1 to 999999999)")
    return number


def parse_ref(ref: str) -> tuple[str, Union[int, str]]:
    """`NAME@prod` → (NAME, 'prod'); `NAME@3` → (NAME, 3); `NAME@latest` or `NAME` → (NAME, 'latest')."""
    if not isinstance(ref, str) or not ref:
        raise RegistryError("empty model reference (expected NAME@STAGE or NAME@VERSION)")
    name, sep, selector = ref.partition("@")
    validate_name(name)
    if not sep or selector == LATEST:
        return name, LATEST
    if _VERSION.match(selector):
        return name, validate_version(selector)
    return name, validate_stage(selector)


def parse_duration(text: str) -> float:
    """`90s`, `30m`, `24h`, `7d` (a non-negative number and a unit) → seconds."""
    match = _DURATION.match(text.strip().lower()) if isinstance(text, str) else None
    if not match:
        shown = str(text)[:40]
        raise RegistryError(f"'{shown}' is not a duration (a number and a unit s, m, h or d: 90s, 30m, 24h, 7d)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
