"""Sigmoid attention: each weight is ``sigmoid(score + bias)``, with no row normalization.

Paper: Ramapuram et al., "Theory, Analysis, and Best Practices for Sigmoid Self-Attention",
ICLR 2025 (arXiv 2409.04431). The bias defaults to ``-ln(Lkv)`` (the paper's recommendation,
with the full key length whatever the mask); ``attncc.Sigmoid(bias=b)`` sets it. Causal.

Default sizes: BATCH=2, HEADS=4, SEQ_LEN=256, HEAD_DIM=32; any length works.
Run: ``python examples/sigmoid_attention.py``.
"""

import attncc
from attncc.masks import causal
from attncc.testing import check_example

BATCH, HEADS, SEQ_LEN, HEAD_DIM = 2, 4, 256, 32

sigmoid_attention = attncc.variant(mask=causal, normalizer=attncc.Sigmoid(), name="sigmoid_attention")


def main(backend: str | None = None) -> None:
    check_example(sigmoid_attention, BATCH, HEADS, SEQ_LEN, HEAD_DIM, backend=backend)


if __name__ == "__main__":
    main()
