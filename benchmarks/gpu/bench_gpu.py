"""GPU benchmark of the Triton backend against compiled FlexAttention and torch SDPA.

Setting (issue 6): bfloat16, D = 128, H = 16, batch so that B * L = 32k tokens,
L in {1k, 4k, 16k}; baselines measured in the same run. TFLOP/s count only unmasked
work (4 * D * #unmasked (q, k) pairs per head for the forward, 2.5x that for forward +
backward). Prints a table with ratios to FlexAttention and SDPA and writes it, with the GPU
name and torch / triton versions, to ``benchmarks/results/gpu_<gpu>.md``.

    python benchmarks/gpu/bench_gpu.py [--lengths 1024 4096 16384] [--plot]

Needs a CUDA GPU (H100 or H200); it cannot run on the CPU interpreter.
"""

from __future__ import annotations

import argparse
import math
import platform
from pathlib import Path

import torch

import attncc
from attncc import masks

TOKENS = 32 * 1024
H, D = 16, 128
DTYPE = torch.bfloat16
RESULTS = Path(__file__).resolve().parents[1] / "results"


def _timeit(fn, warmup: int = 5, reps: int = 20) -> float:
    """Median milliseconds of ``fn`` over ``reps`` CUDA-event-timed runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _unmasked_pairs(mask_fn, Lq: int, Lkv: int, q_offset: int = 0) -> int:
    if mask_fn is None:
        return Lq * Lkv
    rows = []
    kv = torch.arange(Lkv, device="cuda")
    for start in range(0, Lq, 1024):
        q = torch.arange(start, min(Lq, start + 1024), device="cuda") + q_offset
        rows.append(mask_fn(0, 0, q.view(-1, 1), kv.view(1, -1)).sum())
    return int(sum(r.item() for r in rows))


def _cases(L: int):
    slopes = torch.exp2(-torch.arange(1, H + 1, device="cuda", dtype=torch.float32) * 8.0 / H)
    docs = (torch.arange(L, device="cuda") // max(1, L // 8)).to(torch.int32)

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx)

    def softcap(score, b, h, q_idx, kv_idx):
        return 30.0 * torch.tanh(score / 30.0)

    causal = masks.causal
    window = masks.sliding_window(256)
    document = masks.document(docs) & masks.causal
    return {
        "causal": (None, causal, "softmax"),
        "sliding_window_256": (None, window, "softmax"),
        "document_causal": (None, document, "softmax"),
        "alibi_causal": (alibi, causal, "softmax"),
        "softcap_causal": (softcap, causal, "softmax"),
        "sigmoid_causal": (None, causal, "sigmoid"),
    }


def _flex(score_fn, mask_fn, L: int, B: int):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    block_mask = create_block_mask(mask_fn, None, None, L, L, device="cuda") if mask_fn is not None else None
    compiled = torch.compile(flex_attention)
    return lambda q, k, v: compiled(q, k, v, score_mod=score_fn, block_mask=block_mask)


def bench_length(L: int, backward: bool) -> list[dict]:
    B = max(1, TOKENS // L)
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=DTYPE, requires_grad=backward) for _ in range(3))
    do = torch.randn_like(q)
    rows = []
    sdpa_ms = None
    for name, (score_fn, mask_fn, norm) in _cases(L).items():
        var = attncc.variant(score_fn, mask=mask_fn, normalizer=norm, name=name)
        flex = _flex(score_fn, mask_fn, L, B) if norm == "softmax" else None
        pairs = _unmasked_pairs(mask_fn, L, L) * B * H
        flops = 4 * D * pairs * (2.5 if backward else 1.0)

        def run(fn):
            if not backward:
                return lambda: fn(q, k, v)
            return lambda: fn(q, k, v).backward(do)

        ours = _timeit(run(lambda a, b, c, var=var: var(a, b, c, backend="triton")))
        flex_ms = _timeit(run(flex)) if flex is not None else math.nan
        if name == "causal":
            sdpa = lambda a, b, c: torch.nn.functional.scaled_dot_product_attention(a, b, c, is_causal=True)
            sdpa_ms = _timeit(run(sdpa))
        rows.append({
            "L": L, "B": B, "variant": name, "pass": "fwd+bwd" if backward else "fwd",
            "attncc_tflops": flops / ours / 1e9, "flex_tflops": flops / flex_ms / 1e9,
            "vs_flex": flex_ms / ours, "vs_sdpa": (sdpa_ms / ours) if name == "causal" and sdpa_ms else math.nan,
        })
    return rows


def bench_decode() -> dict:
    """Lq = 1, Lkv = 32k, GQA 8:1 against FlexAttention's decoding path."""
    from torch.nn.attention.flex_attention import flex_attention

    B, Lkv, Hkv = 8, 32 * 1024, H // 8
    q = torch.randn(B, H, 1, D, device="cuda", dtype=DTYPE)
    k, v = (torch.randn(B, Hkv, Lkv, D, device="cuda", dtype=DTYPE) for _ in range(2))
    var = attncc.variant(mask=masks.causal)
    ours = _timeit(lambda: var(q, k, v, q_offset=Lkv - 1, backend="triton"))
    compiled = torch.compile(flex_attention)
    flex_ms = _timeit(lambda: compiled(q, k, v, enable_gqa=True))
    flops = 4 * D * B * H * Lkv
    return {"L": Lkv, "B": B, "variant": "decode_gqa8", "pass": "fwd", "attncc_tflops": flops / ours / 1e9,
            "flex_tflops": flops / flex_ms / 1e9, "vs_flex": flex_ms / ours, "vs_sdpa": math.nan}


def format_table(rows: list[dict]) -> str:
    gpu = torch.cuda.get_device_name()
    import triton

    head = [f"# attncc Triton backend on {gpu}", "",
            f"torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}; "
            f"bf16, D={D}, H={H}, B*L={TOKENS}", "",
            "| L | B | variant | pass | attncc TFLOP/s | flex TFLOP/s | attncc/flex | attncc/SDPA |",
            "|---|---|---|---|---|---|---|---|"]
    body = [f"| {r['L']} | {r['B']} | {r['variant']} | {r['pass']} | {r['attncc_tflops']:.1f} | "
            f"{r['flex_tflops']:.1f} | {r['vs_flex']:.2f} | {r['vs_sdpa']:.2f} |" for r in rows]
    return "\n".join(head + body) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--plot", action="store_true", help="also write a bar chart of attncc/flex ratios")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU (H100/H200)")
    rows = []
    for L in args.lengths:
        rows += bench_length(L, backward=False)
        rows += [r for r in bench_length(L, backward=True) if r["variant"] in ("causal", "alibi_causal")]
    rows.append(bench_decode())
    table = format_table(rows)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "gpu_" + torch.cuda.get_device_name().replace(" ", "_")
    (RESULTS / f"{stem}.md").write_text(table)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels = [f"{r['variant']}\n{r['pass']} L={r['L']}" for r in rows]
        fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.5), 4))
        ax.bar(range(len(rows)), [r["vs_flex"] for r in rows])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=6)
        ax.set_ylabel("speed vs compiled FlexAttention")
        fig.tight_layout()
        fig.savefig(RESULTS / f"{stem}.png", dpi=150)


if __name__ == "__main__":
    main()
