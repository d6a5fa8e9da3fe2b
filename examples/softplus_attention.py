"""Softplus attention: ``softplus(s_ij)`` normalized by its row sum instead of ``exp``.

Paper: Gao & Spratling, "Softplus Attention with Re-weighting Boosts Length Extrapolation in
Large Language Models", 2025 (arXiv 2501.13428), which replaces softmax's exponential with
softplus; this example is the plain normalized form (``normalizer="softplus"``), without the
paper's length scaling and re-weighting. Causal.

Default sizes: BATCH=2, HEADS=4, SEQ_LEN=256, HEAD_DIM=32; any length works.
Run: ``python examples/softplus_attention.py``.
"""

import attncc
from attncc.masks import causal
from attncc.testing import check_example

BATCH, HEADS, SEQ_LEN, HEAD_DIM = 2, 4, 256, 32

softplus_attention = attncc.variant(mask=causal, normalizer="softplus", name="softplus_attention")


def main(backend: str | None = None) -> None:
    check_example(softplus_attention, BATCH, HEADS, SEQ_LEN, HEAD_DIM, backend=backend)


if __name__ == "__main__":
    main()
