"""Forward + backward of causal attention on the CPU: attncc's generated kernels against torch SDPA,
float32, bfloat16 and float16, in one interleaved run per length (FlexAttention raises on a CPU
backward, so SDPA is the peer here). ``--kind linear``: causal linear attention (elu+1, and
Lightning's decayed form) against autograd through the chunked torch recurrence
(``attncc.passes.lower_linear.linear_attention``, what one writes by hand without a kernel) and,
up to ``DENSE_MAX``, the dense reference backward attncc used before it had a generated one.
``--kind stick_breaking``: causal stick-breaking against that dense reference backward, with
attncc's causal softmax step beside it for scale.

    python benchmarks/cpu/bench_backward.py
    python benchmarks/cpu/bench_backward.py --output benchmarks/results/cpu_backward_<date>.md --plot out.png
    python benchmarks/cpu/bench_backward.py --kind linear --plot linear.png
    python benchmarks/cpu/bench_backward.py --kind stick_breaking --lengths 1024 2048

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
from attncc.passes.lower_linear import linear_attention

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
B, H, D = 1, 8, 64
LINEAR_FORMS = {"elu1": {}, "lightning": {"feature": "identity", "normalize": False}}
TORCH_RECURRENCE_MAX = 4096  # a step of the torch recurrence takes 20 s at L=16384
DENSE_MAX = 4096  # the dense backward holds several [H, L, L] float32 buffers: 0.5 GB each at 4096


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
            _step(attend, [q, k, v], grad)

        found[f"attncc {name}"] = lambda q=q, k=k, v=v, step=step: step(lambda: program(q, k, v, backend="tvm"))
        found[f"sdpa {name}"] = lambda q=q, k=k, v=v, step=step: step(
            lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    return found


def _step(attend: Callable[[], torch.Tensor], inputs: list[torch.Tensor], grad: torch.Tensor) -> None:
    for t in inputs:
        t.grad = None
    attend().backward(grad)


def linear_contenders(L: int) -> dict[str, Callable[[], None]]:
    """(implementation, form) -> one forward + backward of causal linear attention, float32."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=gen).requires_grad_(True) for _ in range(3))
    grad = torch.randn(B, H, L, D, generator=gen)
    decay = 1.0 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float32))  # RetNet's decays
    found = {}
    for form, options in LINEAR_FORMS.items():
        feature, normalize = options.get("feature", "elu1"), options.get("normalize", True)
        gamma = decay if form == "lightning" else None
        program = attncc.variant(mask=masks.causal, normalizer=attncc.Linear(feature, normalize=normalize,
                                                                             decay=gamma))
        found[f"attncc {form}"] = lambda p=program: _step(lambda: p(q, k, v, backend="tvm"), [q, k, v], grad)
        if L <= TORCH_RECURRENCE_MAX:
            found[f"torch recurrence {form}"] = lambda f=feature, n=normalize, g=gamma: _step(
                lambda: linear_attention(q, k, v, feature=f, normalize=n, decay=g, causal="inclusive"), [q, k, v],
                grad)
        if L <= DENSE_MAX:
            found[f"dense reference {form}"] = lambda p=program: _step(
                lambda: p(q, k, v, backend="reference"), [q, k, v], grad)
    return found


def measure(L: int, rounds: int, make: Callable[[int], dict[str, Callable[[], None]]] = contenders,
            ) -> dict[str, list[float]]:
    fns = make(L)
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


def peer_table(results: dict[int, dict[str, list[float]]], forms: tuple[str, ...], peers: tuple[str, ...],
               note: str) -> str:
    """Rows (L, form): attncc's time, then each peer's time and its ratio to attncc's ("-" where
    the peer did not run at that length)."""
    header = " | ".join(f"{peer} ms" for peer in peers) + " | " + " | ".join(f"vs {peer}" for peer in peers)
    lines = [f"Machine: {machine()}", "", f"| L | form | attncc ms | {header} |",
             "|---|---|---|" + "---|" * 2 * len(peers)]
    for L, samples in results.items():
        for form in forms:
            ours = min(samples[f"attncc {form}"])
            times, ratios = [], []
            for peer in peers:
                name = f"{peer} {form}"
                if name not in samples:
                    times.append("-")
                    ratios.append("-")
                    continue
                times.append(f"{min(samples[name]) * 1e3:.1f}")
                pair = paired(samples, name, f"attncc {form}")
                ratios.append(f"{min(samples[name]) / ours:.2f}x (paired {pair:.2f})")
            lines.append(f"| {L} | {form} | {ours * 1e3:.1f} | " + " | ".join(times + ratios) + " |")
    lines += ["", note + " Ratios above 1: attncc is faster; times are minima over the interleaved rounds."]
    return "\n".join(lines)


def stick_breaking_contenders(L: int) -> dict[str, Callable[[], None]]:
    """Causal stick-breaking, float32: attncc's generated backward, the dense reference backward it
    had before (up to ``DENSE_MAX``), and attncc's causal softmax step for scale."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=gen).requires_grad_(True) for _ in range(3))
    grad = torch.randn(B, H, L, D, generator=gen)
    program = attncc.variant(mask=masks.causal, normalizer="stick_breaking")
    softmax = attncc.variant(mask=masks.causal)
    found = {"attncc stick_breaking": lambda: _step(lambda: program(q, k, v, backend="tvm"), [q, k, v], grad),
             "attncc softmax stick_breaking": lambda: _step(lambda: softmax(q, k, v, backend="tvm"), [q, k, v], grad)}
    if L <= DENSE_MAX:
        found["dense reference stick_breaking"] = lambda: _step(
            lambda: program(q, k, v, backend="reference"), [q, k, v], grad)
    return found


KINDS = {
    "softmax": (contenders, table, (1024, 2048), "Causal attention training step on the CPU"),
    "linear": (linear_contenders, lambda results: peer_table(
        results, tuple(LINEAR_FORMS), ("torch recurrence", "dense reference"),
        f"Causal linear attention, float32, B={B}, H={H}, D={D}, forward + backward; elu1: Linear() (elu+1 "
        "features, normalized); lightning: identity features, no normalizer, RetNet's per-head decays."),
        (4096, 16384), "Causal linear attention training step on the CPU"),
    "stick_breaking": (stick_breaking_contenders, lambda results: peer_table(
        results, ("stick_breaking",), ("dense reference", "attncc softmax"),
        f"Causal stick-breaking, float32, B={B}, H={H}, D={D}, forward + backward; attncc softmax: the causal "
        "softmax step on the same inputs, for scale."),
        (1024, 2048, 8192), "Causal stick-breaking training step on the CPU"),
}


def plot(results: dict[int, dict[str, list[float]]], path: str,
         title: str = "Causal attention training step on the CPU") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(name for samples in results.values() for name in samples))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):  # a contender that did not run at a length has no bar there
        xs = [j + i * width for j, samples in enumerate(results.values()) if name in samples]
        ax.bar(xs, [min(samples[name]) * 1e3 for samples in results.values() if name in samples], width,
               label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(results))], [f"L={L}" for L in results])
    ax.set_yscale("log")  # SDPA's float16 backward on the CPU is ten times the rest
    ax.set_ylabel("forward + backward, ms (log; lower is better)")
    ax.set_title(title)
    ax.legend(fontsize=8, ncols=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=sorted(KINDS), default="softmax",
                        help="softmax (against SDPA, three dtypes), linear or stick_breaking")
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="default: softmax 1024 2048, linear 4096 16384, stick_breaking 1024 2048 8192")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved timed rounds per length")
    parser.add_argument("--output", help="also write the markdown table to this file")
    parser.add_argument("--plot", help="draw the times to this PNG")
    args = parser.parse_args()
    make, tabulate, default_lengths, title = KINDS[args.kind]
    results = {L: measure(L, args.rounds, make) for L in args.lengths or default_lengths}
    text = tabulate(results)
    print(text)
    if args.output:
        with open(args.output, "w") as out:
            out.write(text + "\n")
    if args.plot:
        plot(results, args.plot, title)


if __name__ == "__main__":
    main()
