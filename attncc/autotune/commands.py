"""``attncc tune`` and ``attncc cache``: offline tuning and the cache's command line.

``tune`` runs one Optuna study per (variant, shape) and records the winners in the tuning
cache (and optionally a JSON file to ship); it resumes an interrupted run because each
study lives in an Optuna storage. ``cache`` lists, shows, exports, imports, merges,
clears and pins. The CLI registers both lazily (``attncc.cli.LAZY_COMMANDS``).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from attncc.autotune.records import WILDCARD

DTYPES = ("float32", "float16", "bfloat16")


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """``"1x8x512x64,1x8x1x4096x64"`` -> [(1, 8, 512, 64), (1, 8, 1, 4096, 64)].

    A BxHxLqxLkvxD shape with Lq < Lkv is a decoding step: it is tuned with its queries at the
    end of the keys (q_offset = Lkv - Lq, ``study.decode_offset``).
    """
    shapes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            dims = tuple(int(d) for d in part.lower().split("x"))
        except ValueError:
            dims = ()
        if len(dims) not in (4, 5) or min(dims) < 1:
            raise click.BadParameter(
                f"expected BxHxLxD or BxHxLqxLkvxD with positive integers (e.g. 1x8x512x64), got {part!r}",
                param_hint="--shapes")
        shapes.append(dims)
    if not shapes:
        raise click.BadParameter("give at least one shape, e.g. 1x8x512x64", param_hint="--shapes")
    return shapes


def device_problem(device: str) -> str | None:
    """Why ``--device`` cannot be tuned on here (None when it can): said before tuning starts,
    instead of a torch error from the first operand."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        return f"{device!r} is not a device; expected cpu or cuda[:N]"
    if parsed.type not in ("cpu", "cuda"):
        return f"{device!r}: expected cpu or cuda[:N]"
    if parsed.type == "cuda" and not torch.cuda.is_available():
        return f"{device!r}: CUDA is not available on this machine"
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        return f"{device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


def load_backend(name: str | None, device: str) -> Any:
    from attncc.codegen import registry

    name = name or ("triton" if device.startswith("cuda") else "tvm")
    if name not in registry.BACKEND_MODULES:
        raise click.BadParameter(f"unknown backend {name!r}; expected one of {sorted(registry.BACKEND_MODULES)}",
                                 param_hint="--backend")
    backend = registry.load(name)
    if isinstance(backend, str):
        raise click.ClickException(f"--backend {name}: {backend}")
    return backend


def load_program(spec: str) -> Any:
    from attncc.cli import load_program as load  # NOTE: lazy: attncc.cli imports these commands

    return load(spec)


def example_programs() -> dict[str, Any]:
    """Every program defined in ``examples/*.py`` (the checkout's, else the current directory's)."""
    from attncc.loader import load_all

    root = Path(__file__).resolve().parents[2] / "examples"
    if not root.is_dir():
        root = Path("examples")
    found = {}
    for path in sorted(root.glob("*.py")):
        if path.name.startswith("_"):
            continue
        try:
            programs = load_all(path)
        except Exception as err:
            click.echo(f"skipping {path}: {type(err).__name__}: {err}", err=True)
            continue
        found.update({f"{path}:{name}": program for name, program in programs.items()})
    return found


@click.command("tune")
@click.argument("specs", nargs=-1, metavar="FILE:NAME...")
@click.option("--shapes", required=True,
              help="BxHxLxD[,BxHxLxD...], or BxHxLqxLkvxD for decoding and cross attention; with Lq < Lkv the "
                   "queries are the last Lq positions (q_offset = Lkv - Lq), as in a decoding step.")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True)
@click.option("--budget", type=click.IntRange(min=1), default=30, show_default=True,
              help="Measured trials per (variant, shape); a rerun resumes up to this count.")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Also merge the results into this JSON cache file (for shipping).")
@click.option("--storage", default=None,
              help="Optuna storage URL (default: SQLite next to the cache; postgresql://... for a fleet).")
@click.option("--backend", default=None, help="Backend to tune (default: tvm on cpu, triton on cuda).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N].")
@click.option("--all-examples", is_flag=True, help="Tune every program in examples/ (in addition to FILE:NAME).")
@click.option("--seed", type=int, default=0, show_default=True, help="TPE sampler seed.")
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch CPU threads while tuning (part of the CPU's device fingerprint; default: torch's).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def tune(specs: tuple[str, ...], shapes: str, dtype: str, budget: int, out: str | None, storage: str | None,
         backend: str | None, device: str, all_examples: bool, seed: int, warmup: int, repeats: int,
         threads: int | None, no_progress: bool) -> None:
    """Tune the variants NAME defined in FILE for the given shapes; results go to the tuning cache."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)

    from attncc.autotune.cache import TuningCache, merge_json
    from attncc.autotune.shipping import overwrite_problem
    from attncc.autotune.study import tune_program

    shape_list = parse_shapes(shapes)
    if not specs and not all_examples:
        raise click.UsageError("name at least one FILE:NAME, or pass --all-examples")
    if problem := device_problem(device):
        raise click.BadParameter(problem, param_hint="--device")
    if out and (problem := overwrite_problem(out)):
        raise click.BadParameter(problem, param_hint="--out")
    programs = {spec: load_program(spec) for spec in specs}
    if all_examples:
        programs.update(example_programs())
    chosen = load_backend(backend, device)
    cache = TuningCache()
    if (unusable := cache.unusable()) is not None:
        if not out:
            raise click.ClickException(f"tuning cache {cache.path} cannot store results ({unusable}); pass --out FILE "
                                       f"to keep them in a JSON file, or point ATTNCC_CACHE_DIR at another directory")
        click.echo(f"warning: tuning cache {cache.path} cannot store results ({unusable}); they go to {out} only",
                   err=True)
    rows, failures = [], []
    for spec, program in programs.items():
        try:
            results = tune_program(program, chosen, shape_list, getattr(torch, dtype), budget, device=device,
                                   cache=cache, storage=storage, seed=seed, warmup=warmup, repeats=repeats,
                                   progress=not no_progress, label=spec.rpartition(":")[2])
        except KeyboardInterrupt:
            message = "interrupted: finished trials are kept; run the same command to resume"
            raise click.ClickException(message) from None
        except Exception as err:
            if not all_examples:
                raise click.ClickException(f"tuning {spec} failed: {type(err).__name__}: {err}") from err
            failures.append(f"{spec}: {type(err).__name__}: {err}")
            continue
        rows += [(spec, r) for r in results]
    _print_results(rows, cache)
    for failure in failures:
        click.echo(f"skipped {failure}", err=True)
    if out:
        try:
            summary = merge_json(out, [], extra=[_results_doc([r for _, r in rows], cache)])
        except OSError as err:  # FileExistsError: OUT became something else while tuning
            raise click.ClickException(f"--out {out}: {err}") from err
        click.echo(f"wrote {out}: {summary['entries']} entries")
    unstored = [r for _, r in rows if r.unstored]
    if unstored:
        message = f"the tuning cache could not store {len(unstored)} result(s): {unstored[0].unstored}"
        if not out:
            raise click.ClickException(f"{message}; nothing was saved")
        click.echo(f"warning: {message}; they are in {out} only", err=True)
    if not rows:
        raise click.ClickException("nothing was tuned")


def _results_doc(results: list[Any], cache: Any) -> dict[str, Any]:
    """The JSON cache of this run for ``--out``, built from the measured results: the local
    cache may have stored none of them. An entry the cache holds for the same key joins them,
    and the merge keeps the better of the two, as the cache does."""
    from attncc.autotune.records import FORMAT, FORMAT_VERSION

    entries = [r.entry.to_json() for r in results if r.entry is not None]
    entries += [e.to_json() for r in results if (e := cache.get(r.key)) is not None]
    measured = {r.key.device: r.device_description for r in results if r.device_description}
    return {"format": FORMAT, "version": FORMAT_VERSION, "devices": {**cache.devices(), **measured},
            "entries": entries, "pins": []}


def _note(r: Any) -> str:
    """The table's note on one result: never says stored or kept when the cache stored nothing."""
    if r.best_config is None:
        return "no config ran correctly (see warnings)"
    note = ""
    if r.unstored:
        note = "NOT stored: the tuning cache cannot take writes"
    elif r.pinned:
        note = "pinned: the pin still wins"
    elif not r.stored:
        note = "cache kept a better result"
    if r.confirmed and r.speedup < 1.02:
        note = (note + "; " if note else "") + "no speedup side by side (noisy machine?)"
    return note


def _print_results(rows: list[tuple[str, Any]], cache: Any) -> None:
    from rich.table import Table

    table = Table(title=f"tuning results (cache {cache.path})")
    columns = ("variant", "shape bucket", "trials", "study: default ms", "study: tuned ms",
               "side by side: default / tuned ms", "speedup", "config", "note")
    for column in columns:
        table.add_column(column)
    for spec, r in rows:
        note = _note(r)
        speedup = f"{r.speedup:.2f}x" if math.isfinite(r.speedup) else "-"
        pair = f"{_ms(r.confirmed[0])} / {_ms(r.confirmed[1])}" if r.confirmed else "-"
        table.add_row(spec.rpartition(":")[2], r.key.shape.tag, str(r.trials), _ms(r.default_ms), _ms(r.best_ms),
                      pair, speedup, json.dumps(r.best_config, sort_keys=True), note)
    _console().print(table)


def _console() -> Any:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # NOTE: piped output keeps whole configs instead of wrapping at 80 columns
        console = Console(width=240)
    return console


def _ms(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else "-"


# ---------------------------------------------------------------- attncc cache ...

@click.group("cache")
def cache() -> None:
    """Inspect and manage the tuning cache ($ATTNCC_CACHE_DIR or the user cache directory)."""


def _cache() -> Any:
    from attncc.autotune.cache import TuningCache

    return TuningCache()


@contextlib.contextmanager
def _writing() -> Iterator[Any]:
    """The tuning cache for a command that changes it. A cache that cannot store anything (an
    unwritable directory, another attncc's schema) fails the command, naming the cache: it used
    to report success while nothing was stored."""
    from attncc.autotune.cache import CacheUnavailable

    db = _cache()
    try:
        if (reason := db.unusable()) is not None:
            raise CacheUnavailable(f"tuning cache {db.path} cannot store anything ({reason})")
        yield db
    except CacheUnavailable as err:
        raise click.ClickException(f"{err}; ATTNCC_CACHE_DIR selects another cache directory") from None


def _readable() -> Any:
    """The tuning cache for a command that copies it out: one that cannot be opened is an
    error, not an empty file reported as exported."""
    db = _cache()
    if (reason := db.unusable()) is not None:
        raise click.ClickException(f"tuning cache {db.path} cannot be read ({reason})")
    return db


@cache.command("ls")
def cache_ls() -> None:
    """List tuned entries and pins."""
    from rich.table import Table

    db = _cache()
    entries, pins, devices = db.entries(), db.pins(), db.devices()
    table = Table(title=f"{db.path}: {len(entries)} entries, {len(pins)} pins")
    for column in ("variant", "backend", "device", "shape bucket", "ms", "trials", "config"):
        table.add_column(column)
    for e in entries:
        table.add_row(e.key.fingerprint[:12], e.key.backend, _device_label(e.key.device, devices), e.key.shape.tag,
                      f"{e.time_ms:.4g}", str(e.trials), json.dumps(e.config, sort_keys=True))
    for p in pins:
        table.add_row(p.fingerprint[:12], p.backend, _device_label(p.device, devices), p.shape, "pinned", "",
                      json.dumps(p.config, sort_keys=True))
    _console().print(table)


def _device_label(device: str, devices: dict[str, Any]) -> str:
    description = devices.get(device)
    if not description:
        return device
    name = description.get("name") or description.get("model") or ""
    return f"{device} ({name})"


@cache.command("show")
@click.argument("key")
def cache_show(key: str) -> None:
    """Print the entries and pins whose key starts with KEY (FINGERPRINT[/BACKEND[/DEVICE[/SHAPE]]]) as JSON."""
    db = _cache()
    entries = [e.to_json() for e in db.entries() if e.key.text.startswith(key)]
    pins = [p.to_json() for p in db.pins() if p.text.startswith(key)]
    if not entries and not pins:
        raise click.ClickException(f"no entry or pin matches {key!r} (see `attncc cache ls`)")
    click.echo(json.dumps({"entries": entries, "pins": pins, "devices": db.devices()}, indent=1, sort_keys=True))


@cache.command("export")
@click.argument("file", type=click.Path(dir_okay=False))
def cache_export(file: str) -> None:
    """Write every entry and pin to a JSON FILE (to ship with a model or a wheel)."""
    from attncc.autotune.shipping import overwrite_problem

    if problem := overwrite_problem(file):
        raise click.ClickException(problem)
    count = _readable().export(file)
    click.echo(f"exported {count} entries to {file}")


@cache.command("import")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
def cache_import(files: tuple[str, ...]) -> None:
    """Merge JSON FILES into the cache: a faster entry wins, local pins are kept."""
    with _writing() as db:
        for file in files:
            summary = db.import_json(file)
            click.echo(f"{file}: stored {summary['stored']}, kept {summary['kept']} better local, "
                       f"{summary['pins']} new pins, {summary['skipped']} skipped")


@cache.command("merge")
@click.argument("out", type=click.Path(dir_okay=False))
@click.argument("inputs", nargs=-1, type=click.Path(exists=True, dir_okay=False))
def cache_merge(out: str, inputs: tuple[str, ...]) -> None:
    """Merge JSON INPUTS (or, with none, the local cache) into OUT, keeping the best entry per key.

    An OUT that exists and is not a readable tuning cache is refused, never overwritten."""
    from attncc.autotune.cache import merge_json

    try:
        summary = merge_json(out, list(inputs), cache=None if inputs else _readable())
    except FileExistsError as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"{out}: {summary['entries']} entries, {summary['pins']} pins, {summary['skipped']} skipped")


@cache.command("clear")
@click.option("--yes", is_flag=True, help="Do not ask.")
@click.option("--pins", is_flag=True, help="Remove pins too.")
def cache_clear(yes: bool, pins: bool) -> None:
    """Delete every tuned entry (and pins with --pins)."""
    with _writing() as db:
        if not yes:
            click.confirm(f"delete all tuned entries{' and pins' if pins else ''} in {db.path}?", abort=True)
        click.echo(f"deleted {db.clear(pins=pins)} rows from {db.path}")


@cache.command("pin")
@click.argument("target", metavar="KEY|FILE:NAME")
@click.option("--config", "config_text", default=None, help="The config as JSON, e.g. '{\"tile_q\": 16, ...}'.")
@click.option("--backend", default="tvm", show_default=True, help="Backend (for FILE:NAME).")
@click.option("--shapes", default=None, help="Pin for these shapes only (FILE:NAME); default: every shape.")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True)
@click.option("--any-device", is_flag=True, help="Pin on every device, not only this machine's.")
@click.option("--note", default="", help="Why it is pinned.")
@click.option("--remove", is_flag=True, help="Remove the pin instead.")
def cache_pin(target: str, config_text: str, backend: str, shapes: str | None, dtype: str, any_device: bool,
              note: str, remove: bool) -> None:
    """Pin a config for KEY (FINGERPRINT/BACKEND/DEVICE|*/SHAPE|*) or a variant FILE:NAME; tuning never changes it."""
    from attncc.autotune.records import Pin, config_problem

    targets = _pin_targets(target, backend, shapes, dtype, any_device)
    if remove:
        with _writing() as db:
            for fingerprint, backend_, device, shape in targets:
                removed = db.unpin(fingerprint, backend_, device, shape)
                click.echo(f"removed {removed} pin(s) {fingerprint}/{backend_}/{device}/{shape}")
        return
    if config_text is None:
        raise click.UsageError("--config is required (or pass --remove)")
    try:
        config = json.loads(config_text)
    except ValueError as err:
        raise click.BadParameter(f"not JSON: {err}", param_hint="--config") from err
    if problem := config_problem(config):
        raise click.BadParameter(problem, param_hint="--config")
    for _, backend_, _, shape in targets:
        _check_against_space(backend_, config, shape)
    with _writing() as db:
        for fingerprint, backend_, device, shape in targets:
            db.pin(Pin(fingerprint, backend_, device, shape, config, note))
            click.echo(f"pinned {fingerprint}/{backend_}/{device}/{shape} = {json.dumps(config, sort_keys=True)}")


def _pin_targets(target: str, backend: str, shapes: str | None, dtype: str,
                 any_device: bool) -> list[tuple[str, str, str, str]]:
    from attncc.autotune.cache import parse_shape_or_wildcard
    from attncc.autotune.keys import ShapeKey
    from attncc.autotune.lookup import device_for

    path = target.rpartition(":")[0]
    if path and Path(path).is_file():
        program = load_program(target)
        device = WILDCARD if any_device else device_for(backend, None)
        tags = [WILDCARD]
        if shapes:
            tags = [_shape_key(s, dtype, ShapeKey).tag for s in parse_shapes(shapes)]
        return [(program.plan.fingerprint, backend, device, tag) for tag in tags]
    parts = target.split("/")
    if len(parts) != 4 or not all(parts):
        raise click.BadParameter(f"expected FINGERPRINT/BACKEND/DEVICE/SHAPE (device, shape may be *) or "
                                 f"FILE:NAME, got {target!r}", param_hint="KEY")
    try:
        shape = parse_shape_or_wildcard(parts[3])
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="KEY") from err
    return [(parts[0], parts[1], parts[2], shape)]


def _shape_key(dims: tuple[int, ...], dtype: str, shape_key: Any) -> Any:
    B, H, *lengths, D = dims
    Lq, Lkv = (lengths[0], lengths[0]) if len(lengths) == 1 else lengths
    return shape_key.of(B, H, Lq, D, Lkv=Lkv, dtype=dtype)


def _check_against_space(backend: str, config: dict[str, Any], shape: str) -> None:
    """Refuse a pin the backend's search space would reject: a knob value outside the space, or,
    for every shape (``*``), a combination that no shape accepts. Such a pin was stored and then
    ignored at every lookup."""
    from attncc.autotune.keys import ShapeKey

    space = _pin_space(backend)
    if space is None:
        return
    if shape != WILDCARD:
        problem = space.problem(config, ShapeKey.parse(shape))
    elif problem := space.problem_for_every_shape(config):
        rule = _shape_free_rule(backend)
        if rule is not None and not space.value_problem(config) and not rule(config):
            problem += f"; it breaks {rule.__module__}.{rule.__name__}: {(rule.__doc__ or '').strip()}"
    if problem:
        raise click.BadParameter(problem, param_hint="--config")


def _pin_space(backend: str) -> Any:
    """The search space pins for ``backend`` are checked against (None for a backend without
    one, the reference); an unknown backend is an error naming the known ones."""
    from types import SimpleNamespace

    from attncc.autotune.study import backend_space
    from attncc.codegen import registry

    if backend not in registry.BACKEND_MODULES:
        raise click.BadParameter(f"unknown backend {backend!r}; expected one of {sorted(registry.BACKEND_MODULES)}",
                                 param_hint="backend")
    loaded = registry.load(backend)
    if isinstance(loaded, str):  # NOTE: not runnable here (triton without a GPU): pins are often made for others
        loaded = SimpleNamespace(name=backend)
    try:
        return backend_space(loaded, None)
    except ValueError:
        return None


def _shape_free_rule(backend: str) -> Callable[[dict[str, Any]], bool] | None:
    """The backend's shape-independent validity rule, ``attncc.codegen.<name>.space.fits``, where
    it has one (the module ``study.backend_space`` reads spaces from): quoted in the error, it
    says what to change."""
    import importlib

    try:
        module = importlib.import_module(f"attncc.codegen.{backend}.space")
    except ImportError:
        return None
    rule = getattr(module, "fits", None)
    return rule if callable(rule) else None
