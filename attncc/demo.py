"""``attncc demo``: a few well-known variants, run on the automatic backend and checked.

Each variant is declared here the way a user would (FlexAttention-style functions), run with
``backend=None`` so attncc picks the backend, timed, and compared with the float64 reference
under SEMANTICS.md's tolerance. The exit status is non-zero when any check fails, so the demo
doubles as a smoke test of a fresh install.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch

import attncc
from attncc.testing import assert_close_to_reference, max_abs_error, reference_outputs
from attncc.variant import Variant


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def alibi_variant(heads: int) -> Variant:
    """ALiBi (Press et al. 2022): a per-head linear distance penalty, geometric slopes."""
    slopes = torch.tensor([2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)])

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx).abs()

    return attncc.variant(alibi, mask=causal)


def sliding_window_variant(window: int) -> Variant:
    """Causal sliding window (Longformer, Mistral): each query sees its last ``window`` keys."""

    def sliding_window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    return attncc.variant(mask=sliding_window, name="sliding_window")


def softcap_variant(cap: float) -> Variant:
    """Logit soft-capping (Gemma 2): ``cap * tanh(score / cap)``."""

    def softcap(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    return attncc.variant(softcap, mask=causal)


def document_variant(length: int, documents: int) -> Variant:
    """Document masking: packed sequences attend causally within their own document only."""
    bounds = torch.linspace(0, length, documents + 1).long()[1:-1]
    doc_ids = torch.bucketize(torch.arange(length), bounds, right=True).to(torch.int32)

    def document(b, h, q_idx, kv_idx):
        return (doc_ids[q_idx] == doc_ids[kv_idx]) & (q_idx >= kv_idx)

    return attncc.variant(mask=document, name="document")


def demo_variants(length: int, heads: int) -> dict[str, Variant]:
    """The demo's variants, by display name; captured tensors are sized for ``length``/``heads``."""
    return {
        "causal": attncc.variant(mask=causal, name="causal"),
        "alibi": alibi_variant(heads),
        "window(64)": sliding_window_variant(64),
        "softcap(30)": softcap_variant(30.0),
        "sigmoid": attncc.variant(mask=causal, normalizer="sigmoid", name="sigmoid"),
        "document(4)": document_variant(length, 4),
    }


@dataclass
class Row:
    name: str
    backend: str = "-"
    reason: str = ""
    first_ms: float = math.nan
    best_ms: float = math.nan
    error: float = math.nan
    ok: bool = False
    problem: str = ""


def best_time_ms(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time of ``repeats`` calls: the least disturbed by other load on a shared machine."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def run_one(name: str, var: Variant, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            backend: str | None, repeats: int) -> Row:
    """Run one variant, time it and compare it with the float64 reference; never raises."""
    row = Row(name)
    try:
        start = time.perf_counter()
        out = var(q, k, v, backend=backend)
        row.first_ms = (time.perf_counter() - start) * 1e3
        choice = var.last_choice
        row.backend, row.reason = choice.backend.name, choice.reason
        row.best_ms = best_time_ms(lambda: var(q, k, v, backend=backend), repeats)
        ref64, lowp = reference_outputs(var, {"q": q, "k": k, "v": v})
        row.error = max_abs_error(out, ref64)
        assert_close_to_reference(out, ref64, lowp, k.shape[2])
        row.ok = True
    except AssertionError as err:
        row.problem = str(err)
    except Exception as err:  # the demo reports every failure and goes on
        row.problem = f"{type(err).__name__}: {err}"
        traceback.print_exc()
    return row


def run_demo(length: int = 256, heads: int = 4, head_dim: int = 64, backend: str | None = None,
             repeats: int = 3, seed: int = 0) -> list[Row]:
    """Every demo variant on one set of random float32 inputs ``[1, heads, length, head_dim]``."""
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, length, head_dim, generator=generator) for _ in range(3))
    return [run_one(name, var, q, k, v, backend, repeats) for name, var in demo_variants(length, heads).items()]


def render(rows: list[Row], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column, justify in [("variant", "left"), ("backend", "left"), ("first ms", "right"),
                            ("best ms", "right"), ("max error", "right"), ("check", "center")]:
        table.add_column(column, justify=justify, no_wrap=True)
    for row in rows:
        status = "[green]OK[/green]" if row.ok else "[red]FAIL[/red]"
        table.add_row(row.name, row.backend, f"{row.first_ms:.1f}", f"{row.best_ms:.2f}", f"{row.error:.2e}", status)
    console = Console()
    console.print(table)
    for reason in dict.fromkeys(row.reason for row in rows if row.reason):
        console.print(f"backend choice: {reason}", highlight=False, markup=False)
    for row in rows:
        if row.problem:
            console.print(f"FAIL {row.name}: {row.problem}", style="red", highlight=False, markup=False)


def main(length: int = 256, heads: int = 4, head_dim: int = 64, backend: str | None = None,
         repeats: int = 3) -> int:
    """Run, print the table, and return the exit status (0 when every check passed)."""
    rows = run_demo(length, heads, head_dim, backend, repeats)
    where = "automatic backend" if backend is None else f"backend={backend!r}"
    render(rows, f"attncc demo: B=1 H={heads} L={length} D={head_dim} float32, {where}")
    return 0 if all(row.ok for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
