"""Softplus attention: ``softplus(s_ij)`` normalized by its row sum instead of ``exp``.

Paper: Gao & Spratling, "Softplus Attention with Re-weighting Boosts Length Extrapolation in
Large Language Models", 2025 (arXiv 2501.13428), which replaces softmax's exponential with
softplus; this example is the plain normalized form (``normalizer="softplus"``), without the
paper's length scaling and re-weighting. Causal.

Default sizes: BATCH=2, HEADS=4, SEQ_LEN=256, HEAD_DIM=32; any length works.
Run: ``python examples/softplus_attention.py``.
"""

import torch

import attncc
from attncc.masks import causal
from attncc.testing import check_against_reference

BATCH, HEADS, SEQ_LEN, HEAD_DIM = 2, 4, 256, 32

softplus_attention = attncc.variant(mask=causal, normalizer="softplus", name="softplus_attention")


def main(backend: str | None = None) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(BATCH, HEADS, SEQ_LEN, HEAD_DIM, generator=gen) for _ in range(3))
    check_against_reference(softplus_attention, q, k, v, backend=backend)
    print(f"softplus_attention: ran on {softplus_attention.last_choice.backend.name}, matches the float64 reference")


if __name__ == "__main__":
    main()
