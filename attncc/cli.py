"""The ``attncc`` command line: ``demo`` and ``explain`` here, more commands contributed lazily.

Commands that live in other packages (tuning, the cache, benchmarks) are named once, in
``LAZY_COMMANDS``, as ``"module:attribute"``. They are imported only when listed or run, so a
slow import (Optuna, TVM) costs nothing to ``attncc demo``, and a module that does not exist
yet is simply left out of ``--help``.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import click

from attncc import __version__

# NOTE: the one registry of commands defined outside this file: name -> "module:attribute".
LAZY_COMMANDS: dict[str, str] = {
    "tune": "attncc.autotune.commands:tune",
    "cache": "attncc.autotune.commands:cache",
    "bench": "attncc.bench:bench",
}

BACKENDS = ("reference", "tvm", "triton")


def module_exists(module: str) -> bool:
    """Whether ``module`` can be found, without importing it (its parent packages are imported)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _unavailable(name: str, reason: str) -> click.Command:
    """A stand-in for a contributed command that failed to load: listed, and fails clearly when run."""

    def fail() -> None:
        raise click.ClickException(f"command {name!r} is unavailable: {reason}")

    return click.Command(name, callback=fail, help=f"(unavailable: {reason})", short_help="(unavailable)")


def load_command(name: str, target: str) -> click.Command | None:
    """Import ``"module:attribute"``; None when the module does not exist, a stand-in when it is broken."""
    module_name, _, attribute = target.partition(":")
    if not module_exists(module_name):
        return None
    try:
        command = getattr(importlib.import_module(module_name), attribute)
    except Exception as err:  # a broken contributed module must not break the CLI
        return _unavailable(name, f"{module_name}:{attribute}: {type(err).__name__}: {err}")
    if not isinstance(command, click.Command):
        return _unavailable(name, f"{target} is a {type(command).__name__}, not a click command")
    return command


class LazyGroup(click.Group):
    """A click group that also offers the commands of ``LAZY_COMMANDS`` whose modules exist."""

    def __init__(self, *args: Any, lazy_commands: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = LAZY_COMMANDS if lazy_commands is None else lazy_commands

    def list_commands(self, ctx: click.Context) -> list[str]:
        lazy = [name for name, target in self.lazy_commands.items()
                if name not in self.commands and module_exists(target.partition(":")[0])]
        return sorted([*super().list_commands(ctx), *lazy])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands or cmd_name not in self.lazy_commands:
            return super().get_command(ctx, cmd_name)
        return load_command(cmd_name, self.lazy_commands[cmd_name])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=__version__, prog_name="attncc")
def main() -> None:
    """attncc: a compiler for attention variants."""


@main.command()
@click.option("--length", "-L", type=click.IntRange(min=1), default=256, show_default=True, help="Sequence length.")
@click.option("--heads", "-H", type=click.IntRange(min=1), default=4, show_default=True, help="Number of heads.")
@click.option("--head-dim", "-D", type=click.IntRange(min=1), default=64, show_default=True, help="Head dimension.")
@click.option("--backend", type=click.Choice(BACKENDS), default=None, help="Force a backend (default: automatic).")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Timed runs per variant.")
def demo(length: int, heads: int, head_dim: int, backend: str | None, repeats: int) -> None:
    """Run a few well-known variants, check them against the reference and print a table."""
    from attncc import demo as demo_module

    status = demo_module.main(length=length, heads=heads, head_dim=head_dim, backend=backend, repeats=repeats)
    if status:
        raise click.exceptions.Exit(status)


def load_program(spec: str) -> Any:
    """``FILE:NAME`` -> the program, with every failure (missing file or name, error in the file) a clean error."""
    from attncc.loader import LoadError, load_variant

    try:
        return load_variant(spec)
    except LoadError as err:
        raise click.ClickException(str(err)) from err
    except Exception as err:
        raise click.ClickException(f"loading {spec} failed: {type(err).__name__}: {err}") from err


def parse_tile(text: str) -> tuple[int, int]:
    """``"64x32"`` -> (64, 32); ``"64"`` -> (64, 64)."""
    parts = text.lower().split("x")
    try:
        tile = tuple(int(p) for p in parts)
    except ValueError:
        tile = ()
    if len(tile) == 1:
        tile = (tile[0], tile[0])
    if len(tile) != 2 or min(tile) < 1:
        raise click.BadParameter(f"expected BQxBK with positive integers (e.g. 64x64), got {text!r}",
                                 param_hint="--tile")
    return tile  # type: ignore[return-value]


@main.command()
@click.argument("spec", metavar="FILE:NAME")
@click.option("--passes", is_flag=True, help="Print the graph after every pass.")
@click.option("--blocks", type=click.IntRange(min=1), metavar="L", default=None,
              help="Draw the block map of each attention for Lq = Lkv = L.")
@click.option("--tile", default="64x64", show_default=True, help="Tile BQxBK for --blocks.")
@click.option("--batch", "-B", type=click.IntRange(min=1), default=None,
              help="Batch size for --blocks when the mask reads b (default: from the captured tensors).")
@click.option("--heads", "-H", type=click.IntRange(min=1), default=None,
              help="Query heads for --blocks when the mask reads h (default: from the captured tensors).")
@click.option("--q-offset", type=click.IntRange(min=0), default=0, show_default=True, help="q_offset for --blocks.")
@click.option("--source", is_flag=True, help="Print the generated kernel source of the backend that would run.")
@click.option("--backend", type=click.Choice(BACKENDS), default=None,
              help="Backend for --source (default: the automatic choice for CPU tensors).")
def explain(spec: str, passes: bool, blocks: int | None, tile: str, batch: int | None, heads: int | None,
            q_offset: int, source: bool, backend: str | None) -> None:
    """Print the IR, passes and plan of the variant NAME defined in FILE."""
    from attncc.explain import block_grid_error

    tile_shape = parse_tile(tile)
    too_large = block_grid_error(blocks, tile_shape) if blocks is not None else None
    if too_large:
        raise click.UsageError(too_large)
    program = load_program(spec)
    try:
        click.echo(program.explain())
        if passes:
            click.echo("\n" + format_pass_dumps(program.report.dumps))
        if blocks is not None:
            click.echo("\n" + format_block_maps(program, blocks, tile_shape, batch, heads, q_offset))
        if source:
            click.echo("\n" + kernel_source(program, backend))
    except click.ClickException:
        raise
    except Exception as err:
        raise click.ClickException(f"explaining {spec} failed: {type(err).__name__}: {err}") from err


def format_pass_dumps(dumps: list[tuple[str, str]]) -> str:
    if not dumps:
        return "pass dumps: none recorded (the pipeline ran no passes)"
    sections, previous = [], None
    for name, text in dumps:
        same = text == previous
        sections.append(f"=== {dump_title(name)} ===" + (" (unchanged)" if same else f"\n{text}"))
        previous = text
    return "\n\n".join(sections)


def dump_title(name: str) -> str:
    return "input graph" if name == "input" else f"after {name}"


def kernel_source(program: Any, backend: str | None) -> str:
    """The source a backend generates for this plan: the named one (even if it cannot run on
    this machine: rendering needs no device), else the automatic choice for CPU float32 tensors."""
    import torch

    from attncc.codegen import registry

    plan = program.plan
    if backend is None:
        choice = registry.choose(None, plan, torch.zeros(1, 1, 128, 64))
        chosen, reason = choice.backend, choice.reason
    else:
        chosen = getattr(importlib.import_module(registry.BACKEND_MODULES[backend]), "BACKEND", None)
        if chosen is None:
            raise click.ClickException(f"backend {backend!r} is not implemented yet")
        reason = f"requested; {chosen.unavailable() or 'available here'}"
    header = f"=== source: backend {chosen.name} ({reason}) ==="
    if not hasattr(chosen, "source"):
        return f"{header}\n(backend {chosen.name} generates no source: it runs eager torch)"
    return f"{header}\n{chosen.source(plan)}"


BLOCK_CHARS = {0: ".", 1: "+", 2: "#"}
MAX_SLICES = 4


def region_block_map(program: Any, region: int, L: int, tile: tuple[int, int], q_offset: int,
                     B: int | None, H: int | None) -> Any:
    """int8 ``[B', H', nq, nkv]`` (0 empty, 1 partial, 2 full), as the sparsity pass proves it."""
    import attncc

    try:
        return attncc.block_map(program, L, L, tile, q_offset, B=B, H=H, region=region)
    except ValueError as err:
        raise click.ClickException(f"--blocks: {err} (on the command line: --batch/-B, --heads/-H)") from err


def format_block_grid(grid: Any) -> list[str]:
    """One text line per query tile; one character per kv tile."""
    return ["".join(BLOCK_CHARS[int(x)] for x in row) for row in grid.tolist()]


def format_block_counts(grid: Any) -> str:
    total = grid.numel()
    empty, partial, full = ((grid == c).sum().item() for c in (0, 1, 2))
    visited = (partial + full) / total if total else 0.0
    return f"empty {empty}, partial {partial}, full {full} of {total} tiles: {visited:.1%} visited"


def format_block_maps(program: Any, L: int, tile: tuple[int, int], B: int | None, H: int | None,
                      q_offset: int) -> str:
    """Every region's block map for Lq = Lkv = L, at most ``MAX_SLICES`` (b, h) slices each."""
    lines = [f"block map: Lq = Lkv = {L}, tile {tile[0]}x{tile[1]} (query x key), q_offset={q_offset}",
             "legend: '.' empty (skipped)  '+' partial (mask evaluated)  '#' full (no mask); rows are query tiles"]
    for index, region in enumerate(program.plan.regions):
        blocks = region_block_map(program, index, L, tile, q_offset, B, H)
        b_dim, h_dim = blocks.shape[0], blocks.shape[1]
        lines.append(f"\nregion %{region.node}: {format_block_counts(blocks)}")
        slices = [(b, h) for b in range(b_dim) for h in range(h_dim)]
        for b, h in slices[:MAX_SLICES]:
            b_label = "all b" if b_dim == 1 else f"b={b}"
            h_label = "all h" if h_dim == 1 else f"h={h}"
            lines.append(f"  [{b_label}, {h_label}] {format_block_counts(blocks[b, h])}")
            lines.extend(f"    {row}" for row in format_block_grid(blocks[b, h]))
        if len(slices) > MAX_SLICES:
            lines.append(f"  ... {len(slices) - MAX_SLICES} more (b, h) slices not shown")
    return "\n".join(lines)
