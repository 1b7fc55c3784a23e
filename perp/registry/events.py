"""The append-only, hash-chained event log of one model, and the state replayed from it.

Layout in the store, per model name::

    models/<name>/events/0000000001.json    one immutable object per event, created with If-None-Match: *
    models/<name>/stages/<stage>.json       stage pointer, replaced with If-Match (compare-and-swap)

Every event records ``seq`` (1, 2, ...), ``prev_hash`` (the previous event's hash; 64 zeros for the first) and
``hash`` = sha256 of its canonical JSON without ``hash``. Appending event *n* is a create-if-absent of key *n*:
of several racing writers exactly one wins; the others re-read the log, re-check their request against the new
state (re-evaluating gates, the previous version, ...) and try *n + 1*. No event is ever overwritten, so none is
lost and the chain never forks. The log is the source of truth: after appending, the writer moves the stage
pointer forward with If-Match, never backwards (a pointer only accepts a higher ``seq``), so the final pointer
agrees with the last event for that stage even when writers finish out of order. A writer killed between the two
leaves a stale pointer that the next write on the model repairs; `verify` reports it meanwhile.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import re
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, cast

import perp
from perp.registry.names import RegistryError
from perp.registry.provenance import jsonable, utc_now, who
from perp.store import Store, StoreConflict, StoreError, StoreNotFound

EVENT_SCHEMA = "perp.registry.event/1"
POINTER_SCHEMA = "perp.registry.stage/1"
GENESIS = "0" * 64
EVENT_TYPES = ("register", "promote", "rollback", "deregister")
_EVENT_KEY = re.compile(r"^(\d{10})\.json$")
APPEND_ATTEMPTS = 60


class RegistryIntegrityError(RegistryError):
    """The event log or a manifest does not match its hashes: something in the store was altered."""


class PointerLagWarning(UserWarning):
    """A recorded event whose stage pointer (a convenience copy for readers outside perp) was not updated."""


class RegistryConflict(RegistryError):
    """Concurrent writers kept winning; the request was not recorded."""


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def event_hash(event: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of an event without its `hash` (empty for content no writer produces)."""
    try:
        return hashlib.sha256(canonical({k: v for k, v in event.items() if k != "hash"})).hexdigest()
    except (TypeError, ValueError):  # NaN/Infinity or other non-JSON values: never written by perp
        return ""


def models_prefix() -> str:
    return "models"


def events_prefix(name: str) -> str:
    return f"models/{name}/events"


def event_key(name: str, seq: int) -> str:
    return f"{events_prefix(name)}/{seq:010d}.json"


def stages_prefix(name: str) -> str:
    return f"models/{name}/stages"


def pointer_key(name: str, stage: str) -> str:
    return f"{stages_prefix(name)}/{stage}.json"


# --------------------------------------------------------------------------------------------- state


@dataclass
class VersionState:
    version: int
    manifest_sha256: str
    seq: int
    when: str
    who: dict[str, str]
    deregistered: bool = False
    stages_ever: set[str] = field(default_factory=set)


@dataclass
class ModelState:
    """What the log says now: versions, each stage's stack of versions (top = current), the head."""

    name: str
    versions: dict[int, VersionState] = field(default_factory=dict)
    stacks: dict[str, list[int]] = field(default_factory=dict)
    stage_events: dict[str, tuple[int, str]] = field(default_factory=dict)  # stage -> (seq, hash) of last event
    head_seq: int = 0
    head_hash: str = GENESIS

    @property
    def next_version(self) -> int:
        return max(self.versions, default=0) + 1

    def current(self, stage: str) -> Optional[int]:
        stack = self.stacks.get(stage)
        return stack[-1] if stack else None

    def stages_of(self, version: int) -> list[str]:
        return sorted(stage for stage, stack in self.stacks.items() if stack and stack[-1] == version)

    def require_version(self, version: int) -> VersionState:
        if version not in self.versions:
            known = sorted(self.versions)
            shown = f"{known[0]}..{known[-1]}" if len(known) > 1 else (str(known[0]) if known else "none")
            raise RegistryError(f"model '{self.name}' has no version {version} (registered: {shown})")
        return self.versions[version]

    def apply(self, event: dict[str, Any]) -> None:
        """Advance the state by one event; raises RegistryIntegrityError for an event the state forbids."""
        kind = event.get("type")
        seq = event["seq"]
        where = f"event {seq} of '{self.name}' ({event_key(self.name, seq)})"
        version = event.get("version")
        stage = cast(str, event.get("stage"))
        if kind == "register":
            if version != self.next_version:
                raise RegistryIntegrityError(f"{where} registers version {version}, expected {self.next_version}")
            self.versions[version] = VersionState(version, event["manifest_sha256"], seq, event.get("when", ""),
                                                  event.get("who", {}))
        elif kind == "promote":
            if version not in self.versions or self.versions[version].deregistered:
                raise RegistryIntegrityError(f"{where} promotes version {version}, which is not registered")
            if event.get("previous_version") != self.current(stage):
                raise RegistryIntegrityError(f"{where} says '{stage}' held version {event.get('previous_version')}, "
                                             f"the log says {self.current(stage)}")
            self.stacks.setdefault(stage, []).append(version)
            self.versions[version].stages_ever.add(stage)
            self.stage_events[stage] = (seq, event["hash"])
        elif kind == "rollback":
            stack = self.stacks.get(stage, [])
            before = stack[-2] if len(stack) >= 2 else None  # rolling back a stage's first version empties it
            if not stack or stack[-1] != event.get("previous_version") or before != version:
                raise RegistryIntegrityError(f"{where} rolls '{stage}' back to version {version}, which the log "
                                             "does not allow")
            stack.pop()
            self.stage_events[stage] = (seq, event["hash"])
        elif kind == "deregister":
            if version not in self.versions or self.versions[version].deregistered:
                raise RegistryIntegrityError(f"{where} deregisters version {version}, which is not registered")
            if self.stages_of(version):
                raise RegistryIntegrityError(f"{where} deregisters version {version} while it is in a stage")
            self.versions[version].deregistered = True
            for stack in self.stacks.values():
                stack[:] = [v for v in stack if v != version]
        else:
            raise RegistryIntegrityError(f"{where} has unknown type '{kind}'")
        self.head_seq, self.head_hash = seq, event["hash"]


# --------------------------------------------------------------------------------------------- reading


@dataclass
class LogProblem:
    kind: str
    seq: Optional[int]
    key: str
    message: str


def _fetch(store: Store, keys: list[str]) -> list[Optional[bytes]]:
    def get(key: str) -> Optional[bytes]:
        try:
            return store.get_bytes(key)[0]
        except StoreNotFound:
            return None

    if len(keys) <= 4:
        return [get(key) for key in keys]
    getattr(store, "client", None)  # create a shared S3 client before the threads do
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(get, keys))


def scan_log(store: Store, name: str) -> tuple[list[dict[str, Any]], list[LogProblem]]:
    """Read every event of a model and check the chain. Returns the events read in order and all problems."""
    problems: list[LogProblem] = []
    numbered: dict[int, str] = {}
    for key in store.list_keys(events_prefix(name)):
        match = _EVENT_KEY.match(key.rsplit("/", 1)[-1])
        if not match or key.count("/") != 3:
            problems.append(LogProblem("stray_key", None, key, f"{key} is not an event of '{name}'"))
            continue
        numbered[int(match.group(1))] = key
    if not numbered:
        return [], problems
    last = max(numbered)
    seqs = list(range(1, last + 1))
    keys = [event_key(name, seq) for seq in seqs]
    blobs = _fetch(store, [key for seq, key in zip(seqs, keys) if seq in numbered])
    content = dict(zip([seq for seq in seqs if seq in numbered], blobs))
    events: list[dict[str, Any]] = []
    previous_hash: Optional[str] = GENESIS
    for seq, key in zip(seqs, keys):
        where = f"event {seq} of '{name}' ({key})"
        data = content.get(seq)
        if data is None:
            problems.append(LogProblem("event_missing", seq, key, f"{where} is missing: the log was truncated or "
                                                                   "an event deleted"))
            previous_hash = None
            continue
        try:
            event = json.loads(data)
            if not isinstance(event, dict):
                raise ValueError
        except ValueError:
            problems.append(LogProblem("event_unreadable", seq, key, f"{where} is not valid JSON: it was altered"))
            previous_hash = None
            continue
        recorded = event.get("hash")
        if recorded != event_hash(event):
            problems.append(LogProblem("event_altered", seq, key, f"{where} was altered: its content no longer "
                                                                   "matches its recorded hash"))
        elif event.get("seq") != seq or event.get("name") != name:
            problems.append(LogProblem("event_altered", seq, key, f"{where} records seq {event.get('seq')} of "
                                                                   f"'{event.get('name')}': it was moved or copied"))
        if previous_hash is not None and event.get("prev_hash") != previous_hash:
            prev_where = f"event {seq - 1} of '{name}' ({event_key(name, seq - 1)})"
            problems.append(LogProblem("chain_broken", seq - 1, event_key(name, seq - 1),
                                       f"{prev_where} was altered: its hash no longer matches the prev_hash "
                                       f"recorded by event {seq}"))
        previous_hash = recorded if isinstance(recorded, str) else None
        events.append(event)
    return events, problems


def replay(name: str, events: list[dict[str, Any]]) -> ModelState:
    state = ModelState(name)
    for event in events:
        state.apply(event)
    return state


def load_state(store: Store, name: str) -> tuple[list[dict[str, Any]], ModelState]:
    """The events and the replayed state; any integrity problem is an error (run `perp registry verify`)."""
    events, problems = scan_log(store, name)
    if problems:
        raise RegistryIntegrityError(f"{problems[0].message} (run `perp registry verify` for the full report; "
                                     "refusing to act on an altered log)")
    return events, replay(name, events)


# --------------------------------------------------------------------------------------------- writing


def _read_event(store: Store, name: str, seq: int) -> Optional[dict[str, Any]]:
    try:
        data, _ = store.get_bytes(event_key(name, seq))
    except StoreNotFound:
        return None
    try:
        event = json.loads(data)
        intact = isinstance(event, dict) and event.get("hash") == event_hash(event) and event.get("seq") == seq
    except ValueError:
        intact = False
    if not intact:
        raise RegistryIntegrityError(f"event {seq} of '{name}' ({event_key(name, seq)}) was altered")
    return event


def append_event(store: Store, name: str, build: Callable[[ModelState], dict[str, Any]],
                 attempts: int = APPEND_ATTEMPTS) -> tuple[dict[str, Any], ModelState]:
    """Append the event `build(state)` returns, retrying on lost races with the state re-read.

    `build` may raise (e.g. RegistryError) to refuse the request against the current state: nothing is written.
    Returns the event as stored and the state after it.
    """
    events, state = load_state(store, name)
    author = who(store.principal())
    for attempt in range(attempts):
        body = build(state)
        if body.get("type") not in EVENT_TYPES:
            raise ValueError(f"unknown event type {body.get('type')!r}")
        event = jsonable({**body, "schema": EVENT_SCHEMA, "name": name, "seq": state.head_seq + 1,
                          "prev_hash": state.head_hash, "when": utc_now(), "who": author,
                          "perp_version": perp.__version__})
        event["hash"] = event_hash(event)
        copy.deepcopy(state).apply(event)  # a request the log would reject is a bug: never write it
        try:
            store.put_bytes(event_key(name, event["seq"]), canonical(event) + b"\n", if_none_match=True)
        except StoreConflict:
            existing = _read_event(store, name, event["seq"])
            if existing is not None and existing["hash"] == event["hash"]:
                pass  # our own write, retried by the client after a lost response
            else:
                # Someone else took this seq: catch up on the new events, then re-check the request.
                seq = state.head_seq + 1
                while (new := _read_event(store, name, seq)) is not None:
                    if new.get("prev_hash") != state.head_hash:
                        raise RegistryIntegrityError(f"event {seq} of '{name}' does not chain to event {seq - 1}")
                    state.apply(new)
                    events.append(new)
                    seq += 1
                time.sleep(random.uniform(0.005, 0.05) * min(attempt + 1, 10))
                continue
        state.apply(event)
        events.append(event)
        try:
            sync_all_pointers(store, name, state)  # this event's stage, and any pointer a killed writer left behind
        except StoreError as error:
            # The request is recorded: the log, not the pointer, is the registry. Failing here would make a
            # retry apply it twice (a rollback going back two versions).
            warnings.warn(PointerLagWarning(
                f"the {body.get('type')} event {event['seq']} of '{name}' is recorded, but a stage pointer could "
                f"not be updated ({error}); the next registry write restores it (`perp registry verify` shows it)"))
        return event, state
    raise RegistryConflict(f"could not record the {body.get('type')} event for '{name}' after {attempts} attempts: "
                           "other writers kept winning; nothing was recorded, retry")


def read_pointer(store: Store, name: str, stage: str) -> tuple[Optional[dict[str, Any]], Optional[str]]:
    try:
        data, etag = store.get_bytes(pointer_key(name, stage))
    except StoreNotFound:
        return None, None
    try:
        pointer = json.loads(data)
    except ValueError:
        pointer = {"unreadable": True}
    return pointer, etag


def sync_pointer(store: Store, name: str, state: ModelState, stage: Optional[str], attempts: int = 100) -> None:
    """Move a stage pointer forward to what `state` says (compare-and-swap; never moves it backwards)."""
    if not stage or stage not in state.stage_events:
        return
    seq, digest = state.stage_events[stage]
    target = {"schema": POINTER_SCHEMA, "name": name, "stage": stage, "version": state.current(stage), "seq": seq,
              "event_hash": digest}
    for attempt in range(attempts):
        pointer, etag = read_pointer(store, name, stage)
        current_seq = pointer.get("seq") if isinstance(pointer, dict) else None
        if isinstance(current_seq, int) and current_seq >= seq:
            return  # a later event already moved it
        try:
            if etag is None:
                store.put_bytes(pointer_key(name, stage), canonical(target) + b"\n", if_none_match=True)
            else:
                store.put_bytes(pointer_key(name, stage), canonical(target) + b"\n", if_match=etag)
            return
        except StoreConflict:
            time.sleep(random.uniform(0.002, 0.02) * min(attempt + 1, 10))
    # The event is recorded (the log is authoritative); the pointer catches up on the next write.


def sync_all_pointers(store: Store, name: str, state: ModelState) -> None:
    for stage in state.stage_events:
        sync_pointer(store, name, state, stage)
