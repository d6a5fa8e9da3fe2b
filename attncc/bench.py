"""``attncc bench``: CPU attention benchmarks against the baselines, measured in the same run.

Contenders per case: attncc on the TVM backend, torch SDPA (where the case is expressible),
compiled FlexAttention (``torch.compile(flex_attention)`` with a block mask), and the
reference backend (small cases only: it builds the ``L x L`` matrix). Contenders are
interleaved and the minimum over repeats is kept (the machine is shared and noisy); effective
GFLOP/s count only unmasked work, ``4 * B * H * D * kept_pairs``. ``torch.mm`` at 2048^3
gives the practical ceiling.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import click
import torch

Tensor = torch.Tensor
B, H, D = 1, 8, 64


@dataclass
class Case:
    name: str
    L: int
    dtype: torch.dtype = torch.float32
    program: Callable[[], object] | None = None  # builds the attncc program
    keep: Callable[[Tensor, Tensor], Tensor] | None = None  # dense mask on (q_idx, kv_idx) grids
    flex: tuple | None = None  # (score_mod, mask_mod) for FlexAttention
    sdpa: dict | None = None  # kwargs for SDPA, or None
    reference: bool = False
    results: dict[str, float] = field(default_factory=dict)


def _causal(q, kv):
    return q >= kv


def _window(q, kv):
    return (q >= kv) & (q - kv < 256)


def _documents(L: int) -> Tensor:
    sizes = [L // 2, L // 4, L // 8, L - L // 2 - L // 4 - L // 8]
    return torch.cat([torch.full((n,), i, dtype=torch.int64) for i, n in enumerate(sizes)])


def build_cases(quick: bool) -> list[Case]:
    import attncc
    from attncc import masks

    lengths = (1024,) if quick else (2048, 4096)
    sparse_lengths = (1024,) if quick else (2048, 8192)
    slopes = torch.tensor([2.0 ** (-8.0 * (i + 1) / H) for i in range(H)])
    cases: list[Case] = []
    for L in lengths:
        cases.append(Case("causal", L, program=lambda: attncc.variant(mask=masks.causal), keep=_causal,
                          flex=(None, lambda b, h, q, kv: q >= kv), sdpa={"is_causal": True}, reference=L <= 2048))
    for dtype in (torch.bfloat16, torch.float16):
        L = lengths[0]
        cases.append(Case("causal", L, dtype, program=lambda: attncc.variant(mask=masks.causal), keep=_causal,
                          flex=(None, lambda b, h, q, kv: q >= kv), sdpa={"is_causal": True}))
    for L in sparse_lengths:
        docs = _documents(L)
        cases += [
            Case("window256", L, program=lambda: attncc.variant(mask=masks.causal & masks.sliding_window(256)),
                 keep=_window, flex=(None, lambda b, h, q, kv: (q >= kv) & (q - kv < 256))),
            Case("document", L, program=lambda docs=docs: attncc.variant(mask=lambda b, h, q, kv: docs[q] == docs[kv]),
                 keep=lambda q, kv, docs=docs: docs[q] == docs[kv],
                 flex=(None, lambda b, h, q, kv, docs=docs: docs[q] == docs[kv])),
            Case("alibi", L, program=lambda: attncc.variant(
                lambda s, b, h, q, kv: s - slopes[h] * (q - kv), mask=masks.causal), keep=_causal,
                flex=(lambda s, b, h, q, kv: s - slopes[h] * (q - kv), lambda b, h, q, kv: q >= kv)),
            Case("softcap", L, program=lambda: attncc.variant(
                lambda s, b, h, q, kv: 20.0 * torch.tanh(s / 20.0), mask=masks.causal), keep=_causal,
                flex=(lambda s, b, h, q, kv: 20.0 * torch.tanh(s / 20.0), lambda b, h, q, kv: q >= kv)),
        ]
    L = 1024 if quick else 8192
    for norm in ("sigmoid", "softplus", "stick_breaking"):
        cases.append(Case(norm, L, program=lambda norm=norm: attncc.variant(mask=masks.causal, normalizer=norm),
                          keep=_causal, reference=L <= 2048 or norm != "stick_breaking"))
    return cases


def kept_pairs(case: Case) -> int:
    q = torch.arange(case.L).view(-1, 1)
    kv = torch.arange(case.L).view(1, -1)
    return int(case.keep(q, kv).sum()) if case.keep else case.L * case.L


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def contenders(case: Case, q: Tensor, k: Tensor, v: Tensor) -> dict[str, Callable[[], object]]:
    program = case.program()
    found: dict[str, Callable[[], object]] = {"attncc-tvm": lambda: program(q, k, v, backend="tvm")}
    if case.sdpa is not None:
        found["sdpa"] = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, **case.sdpa)
    if case.flex is not None:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        score_mod, mask_mod = case.flex
        torch._dynamo.reset()  # NOTE: a fresh compile per case; past the recompile limit flex runs eagerly
        block_mask = create_block_mask(mask_mod, None, None, case.L, case.L, device="cpu")
        compiled = torch.compile(flex_attention, dynamic=False)
        found["flex-compiled"] = lambda: compiled(q, k, v, score_mod=score_mod, block_mask=block_mask)
    if case.reference:
        found["reference"] = lambda: program(q, k, v, backend="reference")
    return found


def mm_gflops(repeats: int) -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    best = min(_time(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * 2048**3 / best / 1e9


def run_case(case: Case, repeats: int, echo: Callable[[str], None]) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, case.L, D, generator=gen).to(case.dtype) for _ in range(3))
    fns = contenders(case, q, k, v)
    for name, fn in fns.items():  # warm-up: compiles (timed once, reported separately)
        case.results[f"{name}:first"] = _time(fn)
    best = dict.fromkeys(fns, math.inf)
    for _ in range(repeats):
        for name, fn in fns.items():
            best[name] = min(best[name], _time(fn))
    case.results.update(best)
    echo(f"  {case.name} L={case.L} {str(case.dtype).removeprefix('torch.')}: "
         + ", ".join(f"{n} {t * 1e3:.1f} ms" for n, t in best.items()))


def machine() -> str:
    import tvm

    cpu = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"apache-tvm {tvm.__version__}, python {platform.python_version()}")


def table(cases: list[Case], mm: float) -> str:
    lines = [
        "| case | L | dtype | attncc-tvm ms | GFLOP/s | vs sdpa | vs flex-compiled | vs reference | tvm/mm "
        "| first call s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        r = c.results
        flops = 4 * B * H * D * kept_pairs(c)
        t = r["attncc-tvm"]

        def ratio(name: str, r: dict = r, t: float = t) -> str:
            return f"{r[name] / t:.2f}x" if name in r else "-"

        lines.append(
            f"| {c.name} | {c.L} | {str(c.dtype).removeprefix('torch.')} | {t * 1e3:.1f} | {flops / t / 1e9:.1f} | "
            f"{ratio('sdpa')} | {ratio('flex-compiled')} | {ratio('reference')} | {flops / t / 1e9 / mm:.2f} | "
            f"{r['attncc-tvm:first']:.2f} |"
        )
    lines.append("")
    lines.append("Ratios are baseline time / attncc-tvm time (above 1: attncc is faster). "
                 f"torch.mm 2048^3 in this run: {mm:.1f} GFLOP/s.")
    lines.append("")
    lines.append("| case | L | dtype | contender | ms | GFLOP/s | first call s |")
    lines.append("|---|---|---|---|---|---|---|")
    for c in cases:
        flops = 4 * B * H * D * kept_pairs(c)
        for name, t in c.results.items():
            if ":" in name:
                continue
            lines.append(f"| {c.name} | {c.L} | {str(c.dtype).removeprefix('torch.')} | {name} | {t * 1e3:.1f} | "
                         f"{flops / t / 1e9:.1f} | {c.results[name + ':first']:.2f} |")
    return "\n".join(lines)


def plot(cases: list[Case], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({n for c in cases for n in c.results if ":" not in n})
    labels = [f"{c.name}\n{c.L} {str(c.dtype).removeprefix('torch.')}" for c in cases]
    fig, ax = plt.subplots(figsize=(max(8, len(cases) * 1.1), 5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [4 * B * H * D * kept_pairs(c) / c.results[name] / 1e9 if name in c.results else 0 for c in cases]
        ax.bar([x + i * width for x in range(len(cases))], values, width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(cases))], labels, fontsize=7)
    ax.set_ylabel("effective GFLOP/s (unmasked work)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(quick: bool, repeats: int, echo: Callable[[str], None] = print, only: str | None = None) -> str:
    cases = [c for c in build_cases(quick) if only is None or c.name == only]
    echo(f"machine: {machine()}")
    mm = mm_gflops(repeats)
    echo(f"torch.mm 2048^3: {mm:.1f} GFLOP/s")
    for case in cases:
        run_case(case, repeats, echo)
    text = f"Machine: {machine()}\n\n" + table(cases, mm)
    run.cases = cases  # type: ignore[attr-defined]
    return text


@click.command("bench")
@click.option("--quick", is_flag=True, help="A small set at L=1024 (about a minute, FlexAttention compiles included).")
@click.option("--repeats", default=5, show_default=True, help="Timed runs per contender (minimum kept).")
@click.option("--only", default=None, help="Run only the cases of this name (causal, window256, document, ...).")
@click.option("--plot", "plot_path", default=None, help="Write a bar chart of effective GFLOP/s to this PNG.")
@click.option("--output", default=None, help="Also write the markdown table to this file.")
def bench(quick: bool, repeats: int, only: str | None, plot_path: str | None, output: str | None) -> None:
    """Time attncc's TVM kernels against SDPA, compiled FlexAttention, torch.mm and the reference."""
    text = run(quick, repeats, click.echo, only)
    click.echo(text)
    if output:
        with open(output, "w") as f:
            f.write(text + "\n")
    if plot_path:
        plot(run.cases, plot_path)  # type: ignore[attr-defined]
        click.echo(f"plot written to {plot_path}")
