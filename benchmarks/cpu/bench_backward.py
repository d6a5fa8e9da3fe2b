"""Forward + backward of causal attention on the CPU: attncc's generated kernels against torch SDPA,
float32, bfloat16 and float16, in one interleaved run per length (FlexAttention raises on a CPU
backward, so SDPA is the peer here).

    python benchmarks/cpu/bench_backward.py
    python benchmarks/cpu/bench_backward.py --output benchmarks/results/cpu_backward_<date>.md --plot out.png

Each round calls every contender once untimed, then once timed, in turn; a contender's time is
its minimum over the rounds, and the paired ratio is the median over rounds of the two times
measured side by side (this machine drifts over minutes, see ``attncc.bench``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import attncc
from attncc import masks
from attncc.bench import machine

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
B, H, D = 1, 8, 64


def contenders(L: int) -> dict[str, Callable[[], None]]:
    """(implementation, dtype) -> one forward + backward on fixed random inputs."""
    program = attncc.variant(mask=masks.causal)
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(B, H, L, D, generator=gen) for _ in range(4)]
    found = {}
    for dtype in DTYPES:
        q, k, v = (t.to(dtype).requires_grad_(True) for t in base[:3])
        grad = base[3].to(dtype)
        name = str(dtype).removeprefix("torch.")

        def step(attend: Callable[[], torch.Tensor], q=q, k=k, v=v, grad=grad) -> None:
            q.grad = k.grad = v.grad = None
            attend().backward(grad)

        found[f"attncc {name}"] = lambda q=q, k=k, v=v, step=step: step(lambda: program(q, k, v, backend="tvm"))
        found[f"sdpa {name}"] = lambda q=q, k=k, v=v, step=step: step(
            lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    return found


def measure(L: int, rounds: int) -> dict[str, list[float]]:
    fns = contenders(L)
    for fn in fns.values():  # compiles and first calls
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            fn()
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
        print(f"  L={L}: round {r + 1}/{rounds}", end="\r", flush=True)
    print()
    return samples


def paired(samples: dict[str, list[float]], baseline: str, contender: str) -> float:
    return statistics.median(b / c for b, c in zip(samples[baseline], samples[contender]))


def table(results: dict[int, dict[str, list[float]]]) -> str:
    lines = [f"Machine: {machine()}", "",
             "| L | dtype | attncc ms | sdpa ms | attncc vs sdpa | attncc vs its float32 |",
             "|---|---|---|---|---|---|"]
    for L, samples in results.items():
        for dtype in DTYPES:
            name = str(dtype).removeprefix("torch.")
            ours, sdpa, fp32 = (min(samples[n]) for n in (f"attncc {name}", f"sdpa {name}", "attncc float32"))
            lines.append(
                f"| {L} | {name} | {ours * 1e3:.1f} | {sdpa * 1e3:.1f} | {sdpa / ours:.2f}x "
                f"(paired {paired(samples, f'sdpa {name}', f'attncc {name}'):.2f}) | {fp32 / ours:.2f}x "
                f"(paired {paired(samples, 'attncc float32', f'attncc {name}'):.2f}) |")
    lines += ["", f"Causal, B={B}, H={H}, D={D}, forward + backward; ratios above 1: attncc is faster; "
              "times are minima over the interleaved rounds."]
    return "\n".join(lines)


def plot(results: dict[int, dict[str, list[float]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(next(iter(results.values())))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + i * width for j in range(len(results))]
        ax.bar(xs, [min(s[name]) * 1e3 for s in results.values()], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(results))], [f"L={L}" for L in results])
    ax.set_yscale("log")  # SDPA's float16 backward on the CPU is ten times the rest
    ax.set_ylabel("forward + backward, ms (log; lower is better)")
    ax.set_title("Causal attention training step on the CPU")
    ax.legend(fontsize=8, ncols=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--rounds", type=int, default=10, help="interleaved timed rounds per length")
    parser.add_argument("--output", help="also write the markdown table to this file")
    parser.add_argument("--plot", help="draw the times to this PNG")
    args = parser.parse_args()
    results = {L: measure(L, args.rounds) for L in args.lengths}
    text = table(results)
    print(text)
    if args.output:
        with open(args.output, "w") as out:
            out.write(text + "\n")
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
