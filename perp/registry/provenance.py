"""Who, when, which code: the provenance recorded in manifests and events, and secret scrubbing.

Nothing here reads credentials. `scrub_secrets` removes what could leak one through user-supplied params,
metrics, lineage or extra fields: values of keys that name a secret (password, token, secret, api key, access
key, credential...), the user:password@ part of URLs, signature/credential parameters of presigned URLs, and
AWS access key ids.
"""

from __future__ import annotations

import datetime as _dt
import functools
import getpass
import math
import os
import re
import socket
import subprocess
from pathlib import Path
from typing import Any, Optional

REDACTED = "***"
# Whole key words only: `aws_secret_access_key`, `api_token`, `password` are secrets; `tokens`, `tokens_sha256`,
# `tokenizer` and `max_new_tokens` are not.
_SECRET_KEY = re.compile(
    r"(^|[_-])(secret([_-]access)?([_-]key)?|passw(or)?d|passwd|(access|auth|session|refresh|bearer|api|security)?"
    r"[_-]?token|credentials?|api[_-]?key|access[_-]?key([_-]id)?|session[_-]?key|private[_-]?key|authorization)$",
    re.IGNORECASE)
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")
_PRESIGNED = re.compile(r"(?P<key>X-Amz-(Credential|Signature|Security-Token)|AWSAccessKeyId|Signature)=[^&\s]+",
                        re.IGNORECASE)
_AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def who(principal: Optional[str] = None) -> dict[str, str]:
    """Who acts: the OS user and host as this process sees them (self-reported), and, where the store
    authenticates requests, the identity it authenticated (`principal`, e.g. the AWS ARN of the credentials)."""
    try:
        user = getpass.getuser()
    except Exception:  # no USER and no passwd entry (some containers)
        user = f"uid:{os.getuid()}" if hasattr(os, "getuid") else "unknown"
    author = {"user": user, "host": socket.gethostname()}
    if principal:
        author["principal"] = principal
    return author


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """perp's package version and, when perp runs from a git checkout, its commit and whether it is dirty."""
    import perp

    info: dict[str, Any] = {"perp_version": perp.__version__, "git_commit": None, "git_dirty": None}
    source = Path(perp.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        info["git_commit"] = commit or None
        status = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
        info["git_dirty"] = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def dvc_outs(directory: Optional[Path] = None) -> Optional[dict[str, str]]:
    """The DVC-tracked outputs recorded in `dvc.lock` when registering, as {path: md5}.

    A hash of the whole file would identify nothing: `dvc repro` rewrites dvc.lock stage by stage, so while the
    register stage runs the file holds the upstream stages but not yet its own entry. The upstream outputs' md5s are
    final, and match those of the dvc.lock that is committed afterwards (and of the DVC cache and remote).
    """
    import yaml

    path = (directory or Path.cwd()) / "dvc.lock"
    if not path.is_file():
        return None
    try:
        lock = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    outs: dict[str, str] = {}
    for stage in ((lock or {}).get("stages") or {}).values() if isinstance(lock, dict) else ():
        for out in (stage or {}).get("outs") or () if isinstance(stage, dict) else ():
            if isinstance(out, dict) and isinstance(out.get("path"), str) and isinstance(out.get("md5"), str):
                outs[out["path"]] = out["md5"]
    return outs


def prefect_flow_run_id(explicit: Optional[str] = None) -> Optional[str]:
    """The Prefect flow run a registration belongs to: the id the caller passes (the `register` task does), else
    PREFECT__FLOW_RUN_ID (set for processes a flow run starts). perp itself never imports Prefect."""
    return explicit or os.environ.get("PREFECT__FLOW_RUN_ID") or None


def scrub_secrets(value: Any, key: str = "") -> Any:
    """A copy of a JSON-like value with secrets redacted (see the module docstring)."""
    if isinstance(value, dict):
        return {str(k): scrub_secrets(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub_secrets(v, key) for v in value]
    if key and _SECRET_KEY.search(key) and value not in (None, "", True, False):
        return REDACTED
    if isinstance(value, str):
        value = _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", value)
        value = _PRESIGNED.sub(lambda m: f"{m.group('key')}={REDACTED}", value)
        return _AWS_KEY_ID.sub(REDACTED, value)
    return value


def jsonable(value: Any) -> Any:
    """A strict-JSON copy: paths and unknown objects become strings, non-finite floats 'inf'/'-inf'/'nan'."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [jsonable(v) for v in value]
        return sorted(items, key=str) if isinstance(value, (set, frozenset)) else items
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return jsonable(value.item())
        except (TypeError, ValueError):
            pass
    if hasattr(value, "model_dump"):  # pydantic models
        return jsonable(value.model_dump(mode="json"))
    return str(value)
