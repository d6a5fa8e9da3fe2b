"""The data a tuning cache holds, and the checks every value passes before it is used.

A cache is data, never code: entries are JSON scalars in dicts, parsed with ``json`` and
checked field by field here before a backend sees them. Nothing is unpickled or evaluated.
``warn_once`` keeps a damaged cache from flooding the user: one warning per problem.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

from attncc.autotune.keys import ShapeKey, TuningKey

FORMAT = "attncc-tuning-cache"
FORMAT_VERSION = 1
WILDCARD = "*"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.:+\-]{1,128}$")
_warned: set[str] = set()


class TuningCacheWarning(UserWarning):
    """A cache problem that was skipped (corrupt file or entry, unknown version, ...)."""


def warn_once(tag: str, message: str) -> None:
    """Warn about ``tag`` the first time only, so a damaged cache costs one line, not a flood."""
    if tag in _warned:
        return
    _warned.add(tag)
    warnings.warn(message, TuningCacheWarning, stacklevel=3)


@dataclass(frozen=True)
class Entry:
    """The best measured config for one key; ``origin`` says where it was read from."""

    key: TuningKey
    config: dict[str, Any]
    time_ms: float
    trials: int = 0
    source: str = ""
    verified: bool = True
    updated: float = 0.0
    origin: str = field(default="", compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "fingerprint": self.key.fingerprint, "backend": self.key.backend, "device": self.key.device,
            "shape": self.key.shape.tag, "config": self.config, "time_ms": self.time_ms, "trials": self.trials,
            "source": self.source, "verified": self.verified, "updated": self.updated,
        }


@dataclass(frozen=True)
class Pin:
    """A config fixed by the user; ``device``/``shape`` may be ``"*"`` (any)."""

    fingerprint: str
    backend: str
    device: str
    shape: str
    config: dict[str, Any]
    note: str = ""
    origin: str = field(default="", compare=False)

    @property
    def text(self) -> str:
        return f"{self.fingerprint}/{self.backend}/{self.device}/{self.shape}"

    def specificity(self) -> int:
        """2 for an exact device and shape, 0 for both wildcards: the most specific pin wins."""
        return (self.device != WILDCARD) + (self.shape != WILDCARD)

    def matches(self, key: TuningKey) -> bool:
        return (
            self.fingerprint == key.fingerprint and self.backend == key.backend
            and self.device in (WILDCARD, key.device) and self.shape in (WILDCARD, key.shape.tag)
        )

    def to_json(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "backend": self.backend, "device": self.device,
                "shape": self.shape, "config": self.config, "note": self.note}


def config_problem(config: Any) -> str | None:
    """Why ``config`` is not a flat dict of knob name -> JSON scalar (None when it is)."""
    if not isinstance(config, dict) or not config:
        return f"config must be a non-empty object, got {type(config).__name__}"
    for knob, value in config.items():
        if not isinstance(knob, str) or not _NAME_RE.match(knob):
            return f"config knob {knob!r} is not a plain name"
        if isinstance(value, float) and not math.isfinite(value):
            return f"config[{knob!r}] is not finite"
        if isinstance(value, str) and len(value) > 128:
            return f"config[{knob!r}] is a string longer than 128 characters"
        if not isinstance(value, bool | int | float | str):
            return f"config[{knob!r}] must be a number, string or bool, got {type(value).__name__}"
    return None


def _name_problem(what: str, value: Any, wildcard: bool = False) -> str | None:
    if wildcard and value == WILDCARD:
        return None
    if not isinstance(value, str) or not _NAME_RE.match(value):
        return f"{what} must be a plain name (letters, digits, _.:+-), got {value!r}"
    return None


def entry_from_json(data: Any, origin: str) -> Entry | str:
    """An ``Entry`` from one exported JSON object, or the reason it is rejected."""
    if not isinstance(data, dict):
        return f"entry must be an object, got {type(data).__name__}"
    for name in ("fingerprint", "backend", "device"):
        if problem := _name_problem(name, data.get(name)):
            return problem
    try:
        shape = ShapeKey.parse(data.get("shape") if isinstance(data.get("shape"), str) else "")
    except ValueError as err:
        return str(err)
    if problem := config_problem(data.get("config")):
        return problem
    time_ms = data.get("time_ms")
    if isinstance(time_ms, bool) or not isinstance(time_ms, int | float) or not (0 < time_ms < math.inf):
        return f"time_ms must be a positive finite number, got {time_ms!r}"
    trials, source = data.get("trials", 0), data.get("source", "")
    verified, updated = data.get("verified", True), data.get("updated", 0.0)
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 0:
        return f"trials must be a non-negative int, got {trials!r}"
    if not isinstance(source, str) or not isinstance(verified, bool):
        return "source must be a string and verified a bool"
    if isinstance(updated, bool) or not isinstance(updated, int | float) or not math.isfinite(updated):
        return f"updated must be a finite number, got {updated!r}"
    key = TuningKey(data["fingerprint"], data["backend"], data["device"], shape)
    return Entry(key, dict(data["config"]), float(time_ms), trials, source, verified, float(updated), origin)


def pin_from_json(data: Any, origin: str) -> Pin | str:
    """A ``Pin`` from one exported JSON object, or the reason it is rejected."""
    if not isinstance(data, dict):
        return f"pin must be an object, got {type(data).__name__}"
    for name, wildcard in (("fingerprint", False), ("backend", False), ("device", True)):
        if problem := _name_problem(name, data.get(name), wildcard):
            return problem
    shape = data.get("shape")
    if shape != WILDCARD:
        try:
            ShapeKey.parse(shape if isinstance(shape, str) else "")
        except ValueError as err:
            return str(err)
    if problem := config_problem(data.get("config")):
        return problem
    note = data.get("note", "")
    if not isinstance(note, str):
        return "note must be a string"
    return Pin(data["fingerprint"], data["backend"], data["device"], shape, dict(data["config"]), note, origin)


def document_problem(doc: Any) -> str | None:
    """Why a parsed JSON file is not an attncc tuning cache of a known version."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        return f"not an attncc tuning cache (expected \"format\": {FORMAT!r})"
    if doc.get("version") != FORMAT_VERSION:
        return f"unknown tuning cache version {doc.get('version')!r} (this attncc reads {FORMAT_VERSION})"
    for name in ("entries", "pins"):
        if not isinstance(doc.get(name, []), list):
            return f"{name!r} must be a list"
    if not isinstance(doc.get("devices", {}), dict):
        return "'devices' must be an object"
    return None


def better(new: Entry, old: Entry | None) -> bool:
    """Keep the faster verified result; an unverified one never replaces a verified one."""
    if old is None:
        return True
    if old.verified and not new.verified:
        return False
    if new.verified and not old.verified:
        return True
    return new.time_ms < old.time_ms
