"""Causal sliding-window attention: each query sees its last WINDOW keys, itself included.

Papers: Beltagy, Peters & Cohan, "Longformer: The Long-Document Transformer", 2020;
Jiang et al., "Mistral 7B", 2023 (window W: ``q_idx - W < kv_idx <= q_idx``). This is
``attncc.masks.sliding_window(W)``; attention-gym's ``generate_sliding_window(W)`` keeps one
more key (``q_idx - kv_idx <= W``).

Default sizes: BATCH=2, HEADS=4, SEQ_LEN=256, HEAD_DIM=32, WINDOW=64; any length works.
Run: ``python examples/sliding_window.py``.
"""

import attncc
from attncc.testing import check_example

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
    check_example(sliding_window, BATCH, HEADS, SEQ_LEN, HEAD_DIM, backend=backend, label=f"sliding_window({WINDOW})")


if __name__ == "__main__":
    main()
