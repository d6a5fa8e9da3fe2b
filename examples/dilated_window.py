"""Dilated sliding window: WINDOW keys spaced DILATION apart, ending at the query.

Paper: Beltagy, Peters & Cohan, "Longformer: The Long-Document Transformer", 2020, Section 3.1
("dilated sliding window"): the query sees ``q_idx - t * DILATION`` for ``t = 0 .. WINDOW-1``,
a receptive field of ``WINDOW * DILATION`` tokens at the cost of WINDOW. Causal. Built from the
mask library, ``attncc.masks.dilated_window``.

Default sizes: BATCH=2, HEADS=4, SEQ_LEN=256, HEAD_DIM=32, WINDOW=16, DILATION=4; any length
works. Run: ``python examples/dilated_window.py``.
"""

import attncc
from attncc import masks
from attncc.testing import check_example

BATCH, HEADS, SEQ_LEN, HEAD_DIM = 2, 4, 256, 32
WINDOW, DILATION = 16, 4

dilated_window_mask = masks.dilated_window(WINDOW, DILATION)
dilated_window = attncc.variant(mask=dilated_window_mask, name="dilated_window")


def main(backend: str | None = None) -> None:
    check_example(dilated_window, BATCH, HEADS, SEQ_LEN, HEAD_DIM, backend=backend, label=str(dilated_window_mask))


if __name__ == "__main__":
    main()
