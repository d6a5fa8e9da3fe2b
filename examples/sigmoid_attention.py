"""Sigmoid attention: each weight is ``sigmoid(score + bias)``, with no row normalization.

Paper: Ramapuram et al., "Theory, Analysis, and Best Practices for Sigmoid Self-Attention",
ICLR 2025 (arXiv 2409.04431). The bias defaults to ``-ln(Lkv)`` (the paper's recommendation,
with the full key length whatever the mask); ``attncc.Sigmoid(bias=b)`` sets it. Causal.

Default sizes: BATCH=2, HEADS=4, SEQ_LEN=256, HEAD_DIM=32; any length works.
Run: ``python examples/sigmoid_attention.py``.
"""

import torch

import attncc
from attncc.masks import causal
from attncc.testing import check_against_reference

BATCH, HEADS, SEQ_LEN, HEAD_DIM = 2, 4, 256, 32

sigmoid_attention = attncc.variant(mask=causal, normalizer=attncc.Sigmoid(), name="sigmoid_attention")


def main(backend: str | None = None) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(BATCH, HEADS, SEQ_LEN, HEAD_DIM, generator=gen) for _ in range(3))
    check_against_reference(sigmoid_attention, q, k, v, backend=backend)
    print(f"sigmoid_attention: ran on {sigmoid_attention.last_choice.backend.name}, matches the float64 reference")


if __name__ == "__main__":
    main()
