"""Softmax with learned sinks: a per-head logit in the denominator that absorbs attention.

Papers: OpenAI, "gpt-oss-120b & gpt-oss-20b Model Card", 2025 (a learned sink logit per head,
with sliding-window layers); Xiao et al., "Efficient Streaming Language Models with Attention
Sinks", ICLR 2024; a zero sink is Miller's "Attention Is Off By One" softmax (2023).
Weights are ``exp(s_ij) / (exp(sink_h) + sum_j exp(s_ij))``: ``attncc.Softmax(sink=...)``,
here with gpt-oss's causal sliding window of WINDOW keys.

Captured: ``sink_logits [HEADS]`` (float32, seeded). Default sizes: BATCH=2, HEADS=4,
SEQ_LEN=256, HEAD_DIM=32, WINDOW=128; any length works. Run: ``python examples/softmax_sinks.py``.
"""

import torch

import attncc
from attncc import masks
from attncc.testing import check_against_reference

BATCH, HEADS, SEQ_LEN, HEAD_DIM = 2, 4, 256, 32
WINDOW = 128

sink_logits = torch.randn(HEADS, generator=torch.Generator().manual_seed(2))
softmax_sinks = attncc.variant(
    mask=masks.sliding_window(WINDOW), normalizer=attncc.Softmax(sink=sink_logits), name="softmax_sinks"
)


def main(backend: str | None = None) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(BATCH, HEADS, SEQ_LEN, HEAD_DIM, generator=gen) for _ in range(3))
    check_against_reference(softmax_sinks, q, k, v, backend=backend, return_lse=True)
    print(f"softmax_sinks: ran on {softmax_sinks.last_choice.backend.name}, matches the float64 reference (output and lse)")


if __name__ == "__main__":
    main()
