"""Causal sliding-window attention: each query sees its last WINDOW keys, itself included.

Papers: Beltagy, Peters & Cohan, "Longformer: The Long-Document Transformer", 2020;
Jiang et al., "Mistral 7B", 2023 (window W: ``q_idx - W < kv_idx <= q_idx``). This is
``attncc.masks.sliding_window(W)``; attention-gym's ``generate_sliding_window(W)`` keeps one
more key (``q_idx - kv_idx <= W``).

Default sizes: BATCH=2, HEADS=4, SEQ_LEN=256, HEAD_DIM=32, WINDOW=64; any length works.
Run: ``python examples/sliding_window.py``.
"""

import torch

import attncc
from attncc.testing import check_against_reference

BATCH, HEADS, SEQ_LEN, HEAD_DIM = 2, 4, 256, 32
WINDOW = 64


def generate_sliding_window(window: int):
    def sliding_window_mask(b, h, q_idx, kv_idx):
        causal = q_idx >= kv_idx
        in_window = q_idx - kv_idx < window
        return causal & in_window

    return sliding_window_mask


sliding_window_mask = generate_sliding_window(WINDOW)
sliding_window = attncc.variant(mask=sliding_window_mask, name="sliding_window")


def main(backend: str | None = None) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(BATCH, HEADS, SEQ_LEN, HEAD_DIM, generator=gen) for _ in range(3))
    check_against_reference(sliding_window, q, k, v, backend=backend)
    print(f"sliding_window({WINDOW}): ran on {sliding_window.last_choice.backend.name}, matches the float64 reference")


if __name__ == "__main__":
    main()
