"""Which config a backend runs with, and why: the run-time half of autotuning.

Lookup order: a pinned config, the exact key, the nearest shape bucket tuned on the same
device, the search space's heuristic default. ``ATTNCC_TUNING=off`` skips the tuned entries
but still honours pins: pins exist so that runs are bit-for-bit reproducible, and turning
tuning off must not silently change a pinned kernel. Every stored config is checked against
the backend's current search space before use, so a stale or hand-edited entry can never
reach a kernel. The answer is memoized per process until the cache is written (by this process at
once; by another, e.g. ``attncc tune``, within ``cache.EXTERNAL_CHECK_SECONDS``), keyed on
everything it reads: the environment variables, the thread count (in the device fingerprint).
Every kernel call asks, so the key is built from small values and memoized normalizations.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import torch

from attncc.autotune import device as devices
from attncc.autotune.cache import TuningCache, default_db_path
from attncc.autotune.keys import ShapeKey, TuningKey, dtype_name
from attncc.autotune.records import warn_once
from attncc.autotune.space import Config, SearchSpace

GPU_BACKENDS = frozenset({"triton"})
_CACHES: dict[str, TuningCache] = {}
_MEMO: dict[tuple, tuple[Config, str, SearchSpace, str]] = {}
# NOTE: the latest selection per plan fingerprint, for explain(): {fingerprint: [(backend, shape, config, source)]}
LAST_SELECTIONS: dict[str, dict[tuple[str, str], tuple[Config, str]]] = {}


def tuning_enabled() -> bool:
    """False when ``ATTNCC_TUNING`` is ``off``/``0``/``false``/``no`` (defaults and pins only)."""
    return _enabled(os.environ.get("ATTNCC_TUNING", "on"))


@functools.lru_cache(maxsize=16)
def _enabled(value: str) -> bool:
    return value.strip().lower() not in {"off", "0", "false", "no"}


def default_cache() -> TuningCache:
    """The process-wide cache at the current default path (``ATTNCC_CACHE_DIR`` is re-read)."""
    override = os.environ.get("ATTNCC_CACHE_DIR")
    home = os.environ.get("HOME") if override and override.startswith("~") else None
    return _default_cache(override, home)


@functools.lru_cache(maxsize=16)
def _default_cache(override: str | None, home: str | None) -> TuningCache:
    """Memoized on what ``default_db_path`` reads (the arguments are only the memo's key):
    building the path costs more than a whole memoized lookup."""
    path = str(default_db_path())
    if path not in _CACHES:
        _CACHES[path] = TuningCache(path)
    return _CACHES[path]


def device_for(backend: str, device: str | torch.device | None) -> str:
    """The device fingerprint for a backend: the current GPU for GPU backends, else the CPU."""
    if device is None and backend not in GPU_BACKENDS:
        return _cpu_fingerprint(torch.get_num_threads())
    if isinstance(device, str) and "-" in device and device.split("-")[0] in ("cpu", "cuda"):
        return device  # already a fingerprint
    if device is None:
        device = "cuda" if backend in GPU_BACKENDS and torch.cuda.is_available() else "cpu"
    return devices.fingerprint(device)


@functools.lru_cache(maxsize=16)
def _cpu_fingerprint(threads: int) -> str:
    """``devices.fingerprint("cpu")`` at ``threads``, memoized: a CPU backend asks on every kernel
    call, and the thread count is the one thing in it that can change."""
    return devices.fingerprint_of(devices.cpu_description(threads))


def select_config(
    backend: str,
    space: SearchSpace,
    plan_fingerprint: str,
    dtype: torch.dtype | str,
    shape: ShapeKey,
    *,
    device: str | torch.device | None = None,
    cache: TuningCache | None = None,
) -> tuple[Config, str]:
    """(config, source): what to run ``plan_fingerprint`` with on this device, and where it came from.

    ``shape``'s dtype is replaced by ``dtype`` so that the two can never disagree.
    """
    if not isinstance(space, SearchSpace):
        raise TypeError(f"space must be an attncc.autotune.SearchSpace, got {type(space).__name__}")
    if not isinstance(shape, ShapeKey):
        raise TypeError(f"shape must be an attncc.autotune.ShapeKey (ShapeKey.of(...)), got {type(shape).__name__}")
    cache = cache if cache is not None else default_cache()
    device_key = device_for(backend, device)
    state = selection_state(cache)
    enabled = state[2]
    # NOTE: the memo keys on the shape and dtype as given; they are merged and validated on a miss
    memo_key = (plan_fingerprint, backend, device_key, shape, dtype, id(space), *state)
    found = _MEMO.get(memo_key)
    if found is None:
        shape = dataclasses.replace(shape, dtype=dtype_name(dtype))
        key = TuningKey(plan_fingerprint, backend, device_key, shape)
        config, source = _select(key, space, cache, enabled)
        # NOTE: holding space keeps id(space) from being reused
        found = _MEMO[memo_key] = (config, source, space, shape.tag)
    config, source, _, tag = found
    LAST_SELECTIONS.setdefault(plan_fingerprint, {})[(backend, tag)] = (dict(config), source)
    return dict(config), source


def selection_state(cache: TuningCache | None = None) -> tuple[str, tuple[int, int], bool, str | None]:
    """What a selection reads besides its key: the cache (path, and its generation, which every
    write changes), whether tuning is on, ``ATTNCC_CACHE_PATH``. A memo of anything decided from
    a selection keys on this as well (``codegen.tvm.forward``'s prepared launches)."""
    cache = cache if cache is not None else default_cache()
    return str(cache.path), cache.generation, tuning_enabled(), os.environ.get("ATTNCC_CACHE_PATH")


def _select(key: TuningKey, space: SearchSpace, cache: TuningCache, enabled: bool) -> tuple[Config, str]:
    pin = cache.find_pin(key)
    if pin is not None:
        problem = space.problem(pin.config, key.shape)
        if problem is None:
            return dict(pin.config), f"pinned ({pin.text} in {pin.origin})"
        warn_once(f"bad-pin:{pin.text}:{key.shape.tag}",
                  f"pinned config {pin.text} ignored for {key.shape.tag}: {problem}")
    if not enabled:
        return space.default_for(key.shape), "default (ATTNCC_TUNING=off)"
    found = _tuned(key, space, cache)
    if found is not None:
        return found
    return space.default_for(key.shape), f"default (no tuned entry for {key.shape.tag} on {key.device})"


def _tuned(key: TuningKey, space: SearchSpace, cache: TuningCache) -> tuple[Config, str] | None:
    """The exact key's best entry, else the nearest usable bucket on the same device."""
    candidates = cache.candidates(key.fingerprint, key.backend, key.device)
    usable = []
    for entry in candidates:
        distance = key.shape.distance(entry.key.shape)
        if distance == float("inf"):
            continue
        problem = space.problem(entry.config, key.shape)
        if problem is not None:
            warn_once(f"stale:{entry.key.text}:{key.shape.tag}",
                      f"tuned config {entry.key.text} from {entry.origin} skipped for {key.shape.tag}: {problem}")
            continue
        usable.append((distance, entry.time_ms, entry.key.shape.tag, entry))
    if not usable:
        _warn_other_devices(key, cache)
        return None
    distance, _, _, entry = min(usable, key=lambda u: u[:3])
    how = "exact key" if distance == 0 else f"nearest bucket {entry.key.shape.tag} on this device"
    return dict(entry.config), f"tuned: {how}, {entry.time_ms:.4g} ms over {entry.trials} trials ({entry.origin})"


def _warn_other_devices(key: TuningKey, cache: TuningCache) -> None:
    others = {e.key.device for e in cache.entries(key.fingerprint, key.backend) if e.key.device != key.device}
    if others:
        warn_once(f"other-device:{key.fingerprint}/{key.backend}",
                  f"{key.fingerprint[:12]} on {key.backend} was tuned only on other devices "
                  f"({', '.join(sorted(others))}); skipping those entries and using the default on {key.device}")


def explain_lines(plan_fingerprint: str) -> list[str]:
    """Lines for ``explain()``: each config selected for this plan in this process and its source."""
    chosen: dict[tuple[str, str], Any] = LAST_SELECTIONS.get(plan_fingerprint, {})
    return [f"{backend} {shape}: {config} <- {source}" for (backend, shape), (config, source) in sorted(chosen.items())]
