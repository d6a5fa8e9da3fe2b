"""Tuning one key with Optuna: a seeded TPE search over a backend's search space.

One study per ``TuningKey`` (the study name is the key's text), stored in an Optuna RDB
storage so an interrupted run resumes and several workers can share one study
(``postgresql://...``). Each trial samples a config; invalid configs and configs that fail
to compile or run are pruned, never fatal; a candidate is timed with warm-up runs and the
median of repeats, and its output is checked against the reference before it can win.
New studies start with the heuristic default and the nearest tuned bucket's best config,
so the result is never worse than what the run-time lookup would already have picked.
"""

from __future__ import annotations

import json
import math
import os
import socket
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from attncc.autotune import device as devices
from attncc.autotune.cache import CacheUnavailable, TuningCache, cache_dir, move_aside_if_damaged
from attncc.autotune.keys import ShapeKey, TuningKey
from attncc.autotune.records import Entry, warn_once
from attncc.autotune.space import Config, SearchSpace

Runner = Callable[[Config], Any]
Checker = Callable[[Any], None]


@dataclass
class TuneResult:
    key: TuningKey
    best_config: Config | None
    best_ms: float
    default_config: Config
    default_ms: float
    trials: int  # measured trials in the study (all workers, all runs)
    seconds: float  # wall time of this call
    stored: bool  # whether the cache now holds this result (False: it already had a better one, or see unstored)
    pinned: bool
    confirmed: tuple[float, float] | None = None  # (default ms, tuned ms) re-measured side by side
    entry: Entry | None = None  # the measured result itself (what ``--out`` ships, whatever the cache did)
    device_description: dict[str, Any] | None = None
    unstored: str | None = None  # why the cache could not store the result (None when it could, or kept a better one)

    @property
    def speedup(self) -> float:
        """default time / tuned time, from the side-by-side re-measurement when there is one (else nan
        when either is unknown). Study times are taken minutes apart; on a busy machine only the
        interleaved pair is a fair comparison."""
        default_ms, best_ms = self.confirmed or (self.default_ms, self.best_ms)
        if not (best_ms > 0 and default_ms > 0 and math.isfinite(default_ms)):
            return math.nan
        return default_ms / best_ms


def confirm_pair(runner: Runner, default: Config, best: Config, *, warmup: int, repeats: int,
                 sync: Callable[[], None], rounds: int = 3) -> tuple[float, float] | None:
    """(default ms, tuned ms): medians of ``rounds`` interleaved measurements (None if one fails)."""
    times: tuple[list[float], list[float]] = ([], [])
    try:
        for _ in range(rounds):
            for config, bucket in ((default, times[0]), (best, times[1])):
                bucket.append(measure(lambda c=config: runner(c), warmup=warmup, repeats=repeats, sync=sync)[0])
    except Exception:
        return None
    return statistics.median(times[0]), statistics.median(times[1])


def default_storage() -> str:
    """The Optuna storage next to the tuning cache (SQLite). A damaged file there is moved aside
    (as the tuning cache does with its own): it holds only trials, whose winners are in the
    tuning cache, and left in place it failed every later ``attncc tune``."""
    path = cache_dir() / "optuna.v1.sqlite"
    path.parent.mkdir(parents=True, exist_ok=True)
    move_aside_if_damaged(path, "Optuna study storage")
    return f"sqlite:///{path}"


def open_storage(url: str | None) -> Any:
    """An Optuna RDB storage; retried briefly because workers starting together race to create tables.

    An explicit storage that cannot be opened is an error naming it (it may be shared by other
    workers, so it is never moved aside).
    """
    import optuna

    url = _with_driver(url or default_storage())
    engine: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite:///"):
        engine = {"creator": _sqlite_creator(url.removeprefix("sqlite:///"))}
    for attempt in range(3):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine)
        except Exception as err:
            if attempt == 2:
                reason = next(iter(str(err).splitlines()), "")  # NOTE: SQLAlchemy appends a help link
                raise RuntimeError(f"Optuna storage {url} cannot be opened ({type(err).__name__}: {reason}); "
                                   f"repair or remove it, or pass another --storage") from err
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def _with_driver(url: str) -> str:
    """``postgresql://`` names whichever driver is installed (SQLAlchemy 2.1 defaults to psycopg 3)."""
    import importlib.util

    if not url.startswith(("postgresql://", "postgres://")):
        return url
    rest = url.split("://", 1)[1]
    for module, dialect in (("psycopg", "psycopg"), ("psycopg2", "psycopg2")):
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{dialect}://{rest}"
    return url


def _sqlite_creator(path: str) -> Callable[[], Any]:
    """SQLite connections in WAL mode without an fsync per commit (Optuna commits several times a trial)."""
    import sqlite3

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(path, timeout=60, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    return connect


def measure(fn: Callable[[], Any], *, warmup: int, repeats: int, sync: Callable[[], None]) -> tuple[float, Any]:
    """Median milliseconds of ``repeats`` calls after ``warmup`` calls, and the last output."""
    out = None
    for _ in range(warmup):
        out = fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, out


def _sync_for(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def _config_text(config: Config) -> str:
    return json.dumps(config, sort_keys=True)


def _measured(study: Any) -> list[Any]:
    """Trials that ran, were checked, and have a time (from every worker)."""
    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return [t for t in done if t.user_attrs.get("measured")]


def _seen(study: Any) -> dict[str, float | None]:
    """Config text -> time (None when it failed): a config is never measured twice."""
    import optuna

    seen: dict[str, float | None] = {}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                       optuna.trial.TrialState.PRUNED)):
        text = t.user_attrs.get("config")
        if text is None or "invalid" in t.user_attrs:
            continue
        if t.user_attrs.get("measured"):
            seen[text] = t.value
        else:
            seen.setdefault(text, None)
    return seen


class _Objective:
    """The Optuna objective of one key: sample, validate, time, check."""

    def __init__(self, space: SearchSpace, shape: ShapeKey, runner: Runner, checker: Checker | None,
                 warmup: int, repeats: int, sync: Callable[[], None]) -> None:
        self.space, self.shape, self.runner, self.checker = space, shape, runner, checker
        self.warmup, self.repeats, self.sync = warmup, repeats, sync
        self.seen: dict[str, float | None] = {}

    def __call__(self, trial: Any) -> float:
        import optuna

        config = {name: trial.suggest_categorical(name, values) for name, values in self.space.params.items()}
        text = _config_text(config)
        trial.set_user_attr("config", text)
        problem = self.space.problem(config, self.shape)
        if problem is not None:
            trial.set_user_attr("invalid", problem)
            raise optuna.TrialPruned(problem)
        if text in self.seen:  # NOTE: repeats return the known time without running, and are not counted
            known = self.seen[text]
            if known is None:
                raise optuna.TrialPruned("failed before")
            return known
        try:
            ms, out = measure(lambda: self.runner(config), warmup=self.warmup, repeats=self.repeats, sync=self.sync)
        except Exception as err:  # a config that fails to compile or run is pruned, not fatal
            self.seen[text] = None
            trial.set_user_attr("error", f"{type(err).__name__}: {err}"[:500])
            raise optuna.TrialPruned(f"{type(err).__name__}: {err}") from None
        if self.checker is not None:
            try:
                self.checker(out)
            except AssertionError as err:
                self.seen[text] = None
                trial.set_user_attr("wrong", str(err)[:500])
                warn_once(f"wrong:{self.shape.tag}:{id(self)}",
                          f"config {config} gives wrong results and is excluded (so is any other wrong config "
                          f"of this study, silently): {err}")
                raise optuna.TrialPruned(f"wrong result: {err}") from None
        self.seen[text] = ms
        trial.set_user_attr("measured", True)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        return ms


def _warm_start(space: SearchSpace, key: TuningKey, cache: TuningCache) -> list[Config]:
    """Default first, then the exact key's and the nearest buckets' cached best configs."""
    configs = [space.default_for(key.shape)]
    pin = cache.find_pin(key)
    neighbours = sorted(cache.candidates(key.fingerprint, key.backend, key.device),
                        key=lambda e: (key.shape.distance(e.key.shape), e.time_ms))
    for config in ([pin.config] if pin else []) + [e.config for e in neighbours[:3]]:
        if space.problem(config, key.shape) is None and config not in configs:
            configs.append(dict(config))
    return configs


def tune_key(
    key: TuningKey,
    space: SearchSpace,
    runner: Runner,
    budget: int,
    *,
    checker: Checker | None = None,
    cache: TuningCache | None = None,
    storage: str | None = None,
    seed: int = 0,
    warmup: int = 2,
    repeats: int = 5,
    device: torch.device | str = "cpu",
    progress: bool = True,
    description: str | None = None,
    confirm: bool = True,
) -> TuneResult:
    """Run (or resume, or join) the study of ``key`` until it holds ``budget`` measured trials."""
    import optuna

    if not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive number of trials, got {budget!r}")
    cache = cache if cache is not None else TuningCache()
    started = time.perf_counter()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=f"attncc/{key.text}", storage=open_storage(storage),
                                direction="minimize", load_if_exists=True)
    existing = study.get_trials(deepcopy=False)
    valid = space.size(key.shape)
    if not existing:
        first = _warm_start(space, key, cache)
        # NOTE: a space no larger than the budget is searched exhaustively, in a fixed order.
        rest = [c for c in space.configs(key.shape) if c not in first] if valid <= budget else []
        for config in first + rest:
            study.enqueue_trial(config, user_attrs={"enqueued": True}, skip_if_exists=True)
    # NOTE: a shared (explicit) storage mixes in the pid so that simultaneous workers sample differently.
    sampler_seed = seed + len(existing) + (os.getpid() if storage else 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.sampler = optuna.samplers.TPESampler(seed=sampler_seed, multivariate=True,
                                                   n_startup_trials=max(3, min(10, budget // 3)))
    objective = _Objective(space, key.shape, runner, checker, warmup, repeats, _sync_for(torch.device(device)))
    objective.seen = _seen(study)
    target = min(budget, valid)

    def done() -> int:
        return len(_measured(study))

    def stop_when_done(study_: Any, trial: Any) -> None:
        if storage:  # other workers' trials
            objective.seen.update(_seen(study_))
        if bar is not None:
            bar.update(done(), best=_best_text(study_))
        failed = sum(1 for ms in objective.seen.values() if ms is None)
        # NOTE: a backend that fails everything (broken build, wrong kernels) stops after a few tries.
        if done() >= target or len(objective.seen) >= valid or (failed >= 3 * budget + 3 and done() == 0):
            study_.stop()

    bar = _Bar(description or key.shape.tag, target) if progress else None
    try:
        if done() < target and len(objective.seen) < valid:
            # NOTE: attempts are capped: invalid samples are cheap but must not loop forever.
            study.optimize(objective, n_trials=20 * budget + 20, callbacks=[stop_when_done], catch=())
    finally:
        if bar is not None:
            bar.close()
        result = _finish(study, key, space, cache, started)
    if confirm and result.best_config not in (None, result.default_config) and math.isfinite(result.default_ms):
        result.confirmed = confirm_pair(runner, result.default_config, result.best_config, warmup=max(1, warmup),
                                        repeats=repeats, sync=objective.sync)
        result.seconds = time.perf_counter() - started
    return result


def _best_text(study: Any) -> str:
    measured = _measured(study)
    return f"{min(t.value for t in measured):.4g} ms" if measured else "-"


def _finish(study: Any, key: TuningKey, space: SearchSpace, cache: TuningCache, started: float) -> TuneResult:
    """Record the study's best measured config in the cache (never over a better one)."""
    measured = _measured(study)
    default = space.default_for(key.shape)
    default_text = _config_text(default)
    default_ms = min((t.value for t in measured if t.user_attrs.get("config") == default_text), default=math.nan)
    best = min(measured, key=lambda t: t.value, default=None)
    stored, unstored, entry, description = False, None, None, None
    if best is not None:
        entry = Entry(key, json.loads(best.user_attrs["config"]), float(best.value), trials=len(measured),
                      source=f"optuna TPE, study attncc/{key.text}", verified=True, updated=time.time())
        description = devices.describe(key.device.split("-")[0]) if key.device == _own(key.device) else None
        try:
            stored = cache.record(entry, description)
        except CacheUnavailable as err:  # NOTE: the result still reaches the caller (and ``--out``)
            unstored = str(err)
    return TuneResult(key, entry.config if entry else None, entry.time_ms if entry else math.nan, default,
                      default_ms, len(measured), time.perf_counter() - started, stored,
                      cache.find_pin(key) is not None, entry=entry, device_description=description,
                      unstored=unstored)


def _own(device_fp: str) -> str | None:
    """This machine's fingerprint for the device kind of ``device_fp`` (for the devices table)."""
    kind = device_fp.split("-")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        return None
    return devices.fingerprint(kind)


class _Bar:
    """A rich progress bar: trials measured of the budget, best time so far."""

    def __init__(self, description: str, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("best {task.fields[best]}"), TimeElapsedColumn())
        self.task = self.progress.add_task(description, total=total, best="-")
        self.progress.start()

    def update(self, completed: int, best: str) -> None:
        self.progress.update(self.task, completed=completed, best=best)

    def close(self) -> None:
        self.progress.stop()


# ---------------------------------------------------------------- programs and backends

def backend_space(backend: Any, plan: Any) -> SearchSpace:
    """A backend's ``search_space``: a SearchSpace, or a function of the plan returning one.

    Falls back to ``attncc.codegen.<name>.space.SPACE`` (where the backends keep their spaces).
    """
    space = getattr(backend, "search_space", None)
    if space is None:
        import importlib

        try:
            space = getattr(importlib.import_module(f"attncc.codegen.{backend.name}.space"), "SPACE", None)
        except ImportError:
            space = None
    if space is not None and not isinstance(space, SearchSpace) and callable(space):
        space = space(plan)
    if not isinstance(space, SearchSpace):
        raise ValueError(f"backend {getattr(backend, 'name', backend)!r} declares no search_space; nothing to tune")
    return space


def decode_offset(shape: tuple[int, ...]) -> int:
    """The ``q_offset`` a tuned shape runs with: Lkv - Lq for a (B, H, Lq, Lkv, D) shape with
    fewer queries than keys, else 0.

    Such a shape is a decoding step, whose queries are the newest positions, at the end of the
    KV cache (as ``attncc bench`` runs it). At offset 0 a causal query would see only the
    first keys, and the study would time and check a different, almost empty problem.
    """
    if len(shape) != 5:
        return 0
    _, _, Lq, Lkv, _ = shape
    return max(0, Lkv - Lq)


def make_operands(program: Any, shape: tuple[int, ...], dtype: torch.dtype,
                  device: torch.device | str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random operands for every q/k/v the program's regions read.

    ``shape`` is (B, H, L, D), or (B, H, Lq, Lkv, D) for decoding and cross attention (run at
    ``decode_offset(shape)``).
    """
    if len(shape) == 4:
        B, H, Lq, D = shape
        Lkv = Lq
    elif len(shape) == 5:
        B, H, Lq, Lkv, D = shape
    else:
        raise ValueError(f"shape must be (B, H, L, D) or (B, H, Lq, Lkv, D), got {shape!r}")
    generator = torch.Generator().manual_seed(seed)
    operands: dict[str, torch.Tensor] = {}
    for region in program.plan.regions:
        for name, length in ((region.q, Lq), (region.k, Lkv), (region.v, Lkv)):
            if name not in operands:
                data = torch.randn((B, H, length, D), generator=generator, dtype=torch.float32)
                operands[name] = data.to(device=device, dtype=dtype)
    return operands


def reference_checker(program: Any, operands: dict[str, torch.Tensor], *, scale: float | None = None,
                      q_offset: int = 0) -> Checker:
    """Asserts SEMANTICS.md's tolerance against the reference (computed on first use, once)."""
    from attncc.testing import assert_close_to_reference, reference_outputs

    cached: list[Any] = []
    region = program.plan.regions[0]
    Lkv = operands[region.k].shape[2]

    def check(out: Any) -> None:
        if not cached:
            cached.append(reference_outputs(program, operands, scale=scale, q_offset=q_offset))
        ref64, lowp = cached[0]
        assert_close_to_reference(out, ref64, lowp, Lkv)

    return check


def tune_program(
    program: Any,
    backend: Any,
    shapes: list[tuple[int, ...]],
    dtype: torch.dtype,
    budget: int,
    *,
    device: torch.device | str = "cpu",
    cache: TuningCache | None = None,
    storage: str | None = None,
    seed: int = 0,
    warmup: int = 2,
    repeats: int = 5,
    progress: bool = True,
    label: str | None = None,
    confirm: bool = True,
) -> list[TuneResult]:
    """Tune ``program`` on ``backend`` for each (B, H, L, D) shape (see make_operands); results land in ``cache``.

    A (B, H, Lq, Lkv, D) shape with Lq < Lkv is tuned as a decoding step: its queries sit at
    the end of the keys (``decode_offset``), in the runner and in the reference check alike.
    """
    plan = program.plan
    space = backend_space(backend, plan)
    results = []
    for shape in shapes:
        operands = make_operands(program, shape, dtype, device, seed)
        region = plan.regions[0]
        q, k, v = operands[region.q], operands[region.k], operands[region.v]
        checker_fn = getattr(backend, "checker", None)
        why_not = checker_fn(plan, q) if checker_fn is not None else None
        if why_not:
            raise ValueError(f"backend {backend.name!r} cannot run {label or program.name}: {why_not}")
        key = TuningKey(plan.fingerprint, backend.name, devices.fingerprint(q.device), ShapeKey.from_tensors(q, k, v))

        q_offset = decode_offset(shape)

        def runner(config: Config, operands: dict[str, torch.Tensor] = operands, q_offset: int = q_offset) -> Any:
            return backend.run(plan, operands, program.tensors, scale=None, q_offset=q_offset, return_lse=False,
                               config=config)

        checker = reference_checker(program, operands, q_offset=q_offset)
        description = f"{label or program.name} {'x'.join(map(str, shape))}"
        results.append(tune_key(key, space, runner, budget, checker=checker, cache=cache, storage=storage,
                                seed=seed, warmup=warmup, repeats=repeats, device=q.device, progress=progress,
                                description=description, confirm=confirm))
    return results
