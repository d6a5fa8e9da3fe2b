"""Block maps at scale: attncc's proven block sparsity vs FlexAttention's ``create_block_mask``.

Issue 4's scale targets. For a causal sliding window, a causal document mask (sorted ids)
and a 2-D neighborhood mask at ``L = 16,384`` (tiles 128 x 128), measured side by side in
one process, contenders alternating, minimum of several runs:

- attncc: ``MaskSparsity.block_tables`` (what a kernel consumes, the counterpart of
  ``BlockMask``) and ``attncc.block_map`` (the dense int8 map); no compile step;
- ``create_block_mask`` eager (dense evaluation of the mask under vmap);
- ``create_block_mask(_compile=True)``: its first call (the compile) is reported apart.

Memory is the peak resident set size during a call minus the resident size before it (the
peak is reset through ``/proc/self/clear_refs``). Then attncc alone at ``L = 1,048,576``.

    python benchmarks/block_map.py [--plot out.png] [--write-results] [--skip-flex]

``--write-results`` writes the table and the machine description to
``benchmarks/results/block_map_cpu.md``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import attncc
from attncc import masks as M
from attncc.passes.sparsify import _cached_classes

RESULTS = Path(__file__).parent / "results" / "block_map_cpu.md"
TILE = 128
ATTNCC_REPEATS = 4  # extra warm attncc calls per round (the machine is shared: millisecond calls get descheduled)


# ---- measuring ------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _release_freed_memory() -> None:
    """Give freed heap pages back to the OS, so a later call's peak RSS shows its own allocations."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def measure(fn: Callable[[], Any], release: bool = False) -> tuple[float, float]:
    """(seconds, peak RSS growth in MiB) of one call; ``release`` first returns freed heap pages
    to the OS so the peak shows this call's own allocations (a cold call: page faults included)."""
    gc.collect()
    if release:
        _release_freed_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    except OSError:
        pass
    before = _status_kb("VmRSS:")
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    peak = _status_kb("VmHWM:")
    del result
    return seconds, max(0, peak - before) / 1024


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return (
        f"{model}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )


# ---- masks ------------------------------------------------------------------------------------


def document_ids(L: int, seed: int = 0) -> torch.Tensor:
    """Sorted document ids: documents of 1..4096 tokens packed to length L."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 4097, (L // 64 + 1,), generator=g)
    ids = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    return ids[:L].contiguous()


def masks(L: int) -> dict[str, M.Mask]:
    side = round(L**0.5)
    assert side * side == L, "the neighborhood mask needs a square grid"
    return {
        "sliding_window(1024)": M.sliding_window(1024),
        "document & causal": M.document(document_ids(L)) & M.causal,
        f"neighborhood(13, grid={side}x{side})": M.neighborhood(13, grid=(side, side)),
    }


def attncc_contenders(mask: M.Mask, L: int) -> tuple[dict[str, Callable[[], Any]], float]:
    """attncc's calls for one mask, and the time to build the variant (trace + passes)."""
    start = time.perf_counter()
    var = attncc.variant(mask=mask)(lambda score, b, h, q_idx, kv_idx: score)
    sp = var.plan.regions[0].sparsity
    build = time.perf_counter() - start

    def tables() -> Any:
        _cached_classes.cache_clear()  # NOTE: time the analysis, not the cache
        return sp.block_tables(1, 1, L, L, (TILE, TILE), 0, var.tensors)

    def block_map() -> Any:
        _cached_classes.cache_clear()
        return attncc.block_map(var, L, L, tile=(TILE, TILE))

    def kv_range() -> Any:
        return sp.kv_range(1, 1, L, L, (TILE, TILE), 0, var.tensors)

    return {"attncc block_tables": tables, "attncc block_map": block_map, "attncc kv_range": kv_range}, build


# ---- the runs ------------------------------------------------------------------------------------


def side_by_side(L: int, runs: int, flex_runs: int, skip_flex: bool) -> list[dict[str, Any]]:
    from torch.nn.attention.flex_attention import create_block_mask

    rows = []
    for name, mask in masks(L).items():
        ours, build = attncc_contenders(mask, L)
        contenders: dict[str, Callable[[], Any]] = dict(ours)
        compile_s = None
        if not skip_flex:
            contenders["flex eager"] = lambda m=mask: create_block_mask(m, None, None, L, L, device="cpu")

            def compiled(m: M.Mask = mask) -> Any:
                return create_block_mask(m, None, None, L, L, device="cpu", _compile=True)

            compile_s, _ = measure(compiled)  # the first call compiles
            contenders["flex compiled"] = compiled
        times: dict[str, list[float]] = {k: [] for k in contenders}
        mems: dict[str, float] = {k: 0.0 for k in contenders}
        for r in range(runs):  # NOTE: alternate the contenders inside every round
            for key, fn in contenders.items():
                if key == "flex eager" and r >= flex_runs:
                    continue
                seconds, mib = measure(fn, release=r == 0)  # NOTE: memory from the cold first round
                times[key].append(seconds)
                if key.startswith("attncc"):  # cheap: a few more warm calls against scheduling noise
                    times[key] += [measure(fn)[0] for _ in range(ATTNCC_REPEATS)]
                mems[key] = max(mems[key], mib)
        row = {"mask": name, "L": L, "build_s": build, "compile_s": compile_s}
        row.update({k: (min(v), mems[k]) for k, v in times.items()})
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def alone(L: int, runs: int) -> list[dict[str, Any]]:
    rows = []
    for name, mask in masks(L).items():
        ours, build = attncc_contenders(mask, L)
        times = {k: [] for k in ours}
        mems = {k: 0.0 for k in ours}
        for r in range(runs):
            for key, fn in ours.items():
                seconds, mib = measure(fn, release=r == 0)
                times[key].append(seconds)
                times[key] += [measure(fn)[0] for _ in range(ATTNCC_REPEATS if L <= 1 << 16 else 2)]
                mems[key] = max(mems[key], mib)
        row = {"mask": name, "L": L, "build_s": build, "compile_s": None}
        row.update({k: (min(v), mems[k]) for k, v in times.items()})
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


# ---- reporting -------------------------------------------------------------------------------------


def _ms(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 10 else f"{s:.1f} s"


def format_row(row: dict[str, Any]) -> str:
    parts = [f"{row['mask']} L={row['L']}"]
    for key, value in row.items():
        if isinstance(value, tuple):
            parts.append(f"{key}: {_ms(value[0])} {value[1]:.1f} MiB")
    return " | ".join(parts)


def table(rows: list[dict[str, Any]], big_rows: list[dict[str, Any]], nq: int) -> str:
    lines = [
        f"### L = {rows[0]['L'] if rows else '-'}, tiles {TILE}x{TILE} ({nq}x{nq} tiles), min of runs, side by side",
        "",
        "| mask | attncc block_tables | attncc block_map | attncc kv_range | flex eager | flex compiled "
        "(compile) | eager / attncc | compiled / attncc |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ours = row["attncc block_tables"][0]

        def cell(key: str, row: dict[str, Any] = row) -> str:
            return f"{_ms(row[key][0])}, {row[key][1]:.1f} MiB" if key in row else "-"

        eager = row.get("flex eager")
        comp = row.get("flex compiled")
        compiled_cell = f"{cell('flex compiled')} ({_ms(row['compile_s'])})" if comp else "-"
        lines.append(
            f"| {row['mask']} | {cell('attncc block_tables')} | {cell('attncc block_map')} | "
            f"{cell('attncc kv_range')} | {cell('flex eager')} | {compiled_cell} | "
            f"{f'{eager[0] / ours:.0f}x' if eager else '-'} | {f'{comp[0] / ours:.0f}x' if comp else '-'} |"
        )
    if big_rows:
        L = big_rows[0]["L"]
        n = -(-L // TILE)
        lines += [
            "",
            f"### attncc alone at L = {L:,} ({n}x{n} = {n * n:,} tiles)",
            "",
            "| mask | block_tables | block_map (dense int8 map) | kv_range (O(q tiles)) "
            "| variant build (trace + passes) |",
            "|---|---|---|---|---|",
        ]
        for row in big_rows:
            cells = [f"{_ms(row[k][0])}, {row[k][1]:.1f} MiB" for k in
                     ("attncc block_tables", "attncc block_map", "attncc kv_range")]
            lines.append(f"| {row['mask']} | {' | '.join(cells)} | {_ms(row['build_s'])} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("attncc block_tables", "attncc block_map", "flex eager", "flex compiled") if k in rows[0]]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(keys)
    for n, key in enumerate(keys):
        xs = [i + n * width for i in range(len(rows))]
        ax.bar(xs, [row[key][0] * 1e3 for row in rows], width, label=key)
    ax.set_xticks([i + width * (len(keys) - 1) / 2 for i in range(len(rows))], [r["mask"] for r in rows], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms (log scale)")
    ax.set_title(f"block map at L={rows[0]['L']}, tiles {TILE}x{TILE}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--L", type=int, default=16384)
    parser.add_argument("--big-L", type=int, default=1 << 20, help="attncc alone at this length (0 to skip)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--flex-eager-runs", type=int, default=2, help="eager create_block_mask is slow and big")
    parser.add_argument("--skip-flex", action="store_true")
    parser.add_argument("--plot", metavar="PNG")
    parser.add_argument("--write-results", action="store_true")
    args = parser.parse_args()

    print(machine())
    rows = side_by_side(args.L, args.runs, args.flex_eager_runs, args.skip_flex)
    big = alone(args.big_L, 3) if args.big_L else []
    text = table(rows, big, -(-args.L // TILE))
    print()
    print(text)
    if args.plot:
        plot(rows, args.plot)
    if args.write_results:
        build = ", ".join(f"{r['mask']}: {_ms(r['build_s'])}" for r in rows)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(
            "# Block maps: attncc vs FlexAttention create_block_mask (CPU)\n\n"
            f"Machine: {machine()}. Produced by `python benchmarks/block_map.py --write-results` "
            f"on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; the machine was shared "
            "(load from other jobs), so absolute times are noisy; contenders alternate within each round. "
            "Times are the minimum over rounds (attncc's millisecond calls also repeat within a round); "
            "memory comes from the first round, run cold (freed heap "
            "pages returned to the OS first).\n\n"
            "attncc times exclude nothing but need no compile step; building the variant (tracing and "
            f"the pass pipeline, once per variant) took {build}. The compiled create_block_mask's "
            "compile is its first call, shown in parentheses and not counted in the ratio. Memory: peak "
            "RSS growth during the call.\n\n"
            "What is compared: `attncc block_tables` builds the same thing as `create_block_mask`'s "
            "`BlockMask` (per q tile, counts and ascending indices of partial and of full kv tiles); the "
            "ratios use it. `attncc block_map` is the dense int8 `[nq, nkv]` map (at 1M tokens that map "
            "alone is 64 MiB); `attncc kv_range` the O(q tiles) per-q-tile kv range. The first compiled "
            "call includes torch.compile's one-time warm-up, so the first mask's compile time is the "
            "largest.\n\n" + text + "\n"
        )
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
