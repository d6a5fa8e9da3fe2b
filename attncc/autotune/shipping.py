"""Tuning caches as JSON files: shipped with a model or a wheel, merged across machines.

A JSON cache is read with ``json`` only (NaN and Infinity rejected) and every entry passes
``records.entry_from_json`` before use; a bad file or entry is warned about once and skipped.
Shipped caches come from ``$ATTNCC_CACHE_PATH`` (an ``os.pathsep`` list of files and
directories) and from the directories of packages named by ``attncc.tuning_caches`` entry
points, located without importing those packages. Writes go through a temporary file and a
rename, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from attncc.autotune.keys import TuningKey
from attncc.autotune.records import (
    FORMAT,
    FORMAT_VERSION,
    Entry,
    Pin,
    better,
    document_problem,
    entry_from_json,
    pin_from_json,
    warn_once,
)


class Layer:
    """The validated contents of one or more JSON caches."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.pins: list[Pin] = []
        self.devices: dict[str, dict[str, Any]] = {}
        self.skipped = 0

    def add(self, doc: dict[str, Any], origin: str) -> None:
        for data in doc.get("entries", []):
            entry = entry_from_json(data, origin)
            if isinstance(entry, str):
                self.skipped += 1
                warn_once(f"json-entry:{origin}:{entry}", f"tuning cache {origin}: skipping entry: {entry}")
            else:
                self.entries.append(entry)
        for data in doc.get("pins", []):
            pin = pin_from_json(data, origin)
            if isinstance(pin, str):
                self.skipped += 1
                warn_once(f"json-pin:{origin}:{pin}", f"tuning cache {origin}: skipping pin: {pin}")
            else:
                self.pins.append(pin)
        self.devices.update({k: v for k, v in doc.get("devices", {}).items() if isinstance(v, dict)})

    def best(self) -> dict[TuningKey, Entry]:
        """One entry per key: the better of duplicates (records.better)."""
        out: dict[TuningKey, Entry] = {}
        for entry in self.entries:
            if better(entry, out.get(entry.key)):
                out[entry.key] = entry
        return out


def _parse_json(path: Path) -> dict[str, Any] | str:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return f"unreadable ({err})"
    return document_problem(doc) or doc


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed in a tuning cache")


def read_json(path: str | Path, layer: Layer | None = None) -> Layer:
    """Read a JSON cache file into ``layer``; a bad file is warned about once and skipped."""
    layer = layer if layer is not None else Layer()
    path = Path(path)
    doc = _parse_json(path)
    if isinstance(doc, str):
        warn_once(f"json:{path}", f"tuning cache {path}: {doc}; skipping it")
        layer.skipped += 1
        return layer
    layer.add(doc, str(path))
    return layer


def write_json(path: str | Path, doc: dict[str, Any]) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def overwrite_problem(path: str | Path) -> str | None:
    """Why writing a tuning cache to ``path`` would destroy a file that is not one (None when
    ``path`` is absent or a readable attncc tuning cache, which a merge keeps the contents of)."""
    path = Path(path)
    if not path.exists():
        return None
    doc = _parse_json(path)
    if isinstance(doc, str):
        return (f"{path} exists and is not a readable attncc tuning cache ({doc}); refusing to overwrite it "
                f"(move it away or choose another file)")
    return None


def merge_json(out: str | Path, inputs: list[str | Path], cache: Any = None,
               extra: list[dict[str, Any]] = ()) -> dict[str, int]:
    """Union of JSON caches (and ``cache``, and ``extra`` documents) into ``out``, the better entry per key.

    ``out`` is read first if it exists, so merging never loses what it already held; an ``out``
    that is not a readable tuning cache (a user's file, a damaged cache) is a FileExistsError
    and stays as it is.
    """
    if problem := overwrite_problem(out):
        raise FileExistsError(problem)
    layer = Layer()
    if Path(out).exists():
        read_json(out, layer)
    for path in inputs:
        read_json(path, layer)
    if cache is not None:
        layer.add(cache.to_json(), str(cache.path))
    for doc in extra:
        layer.add(doc, "tuning results")
    best = layer.best()
    pins = {p.text: p for p in layer.pins}  # NOTE: later layers win for pins (explicit inputs override).
    doc = {"format": FORMAT, "version": FORMAT_VERSION, "devices": layer.devices,
           "entries": [best[k].to_json() for k in sorted(best, key=lambda k: k.text)],
           "pins": [p.to_json() for p in pins.values()]}
    write_json(out, doc)
    return {"entries": len(best), "pins": len(pins), "skipped": layer.skipped}


_SHIPPED: dict[str, Layer] = {}


def shipped_paths() -> list[Path]:
    """JSON files from ``$ATTNCC_CACHE_PATH`` and the ``attncc.tuning_caches`` entry points."""
    roots = [Path(p) for p in os.environ.get("ATTNCC_CACHE_PATH", "").split(os.pathsep) if p]
    roots += _entry_point_dirs()
    files: list[Path] = []
    for root in roots:
        if root.is_dir():
            files += sorted(root.glob("*.json"))
        elif root.is_file():
            files.append(root)
        else:
            warn_once(f"ship:{root}", f"shipped tuning cache {root} does not exist; skipping it")
    return files


def _entry_point_dirs() -> list[Path]:
    """Directories of packages named by ``attncc.tuning_caches`` entry points, found without importing them."""
    from importlib.metadata import entry_points
    from importlib.util import find_spec

    dirs = []
    for ep in entry_points(group="attncc.tuning_caches"):
        top, *rest = ep.module.split(".")
        spec = find_spec(top)
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if not locations:
            warn_once(f"ep:{ep.value}", f"entry point attncc.tuning_caches {ep.name}={ep.value}: no such package")
            continue
        dirs.append(Path(locations[0]).joinpath(*rest))
    return dirs


def shipped() -> Layer:
    """The shipped caches, read once per process (keyed on ``$ATTNCC_CACHE_PATH``)."""
    tag = os.environ.get("ATTNCC_CACHE_PATH", "")
    if tag not in _SHIPPED:
        layer = Layer()
        for path in shipped_paths():
            read_json(path, layer)
        _SHIPPED[tag] = layer
    return _SHIPPED[tag]


def reset_shipped() -> None:
    """Forget the shipped caches read so far (they are re-read on next use)."""
    _SHIPPED.clear()
