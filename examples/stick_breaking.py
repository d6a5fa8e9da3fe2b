"""Stick-breaking attention: the nearest keys break off their share of the stick first.

Paper: Tan, Shen, Yang, Courville & Panda, "Scaling Stick-Breaking Attention: An Efficient
Implementation and In-depth Study", ICLR 2025 (arXiv 2410.17980). With ``beta = sigmoid(s)``,
``p_ij = beta_ij * prod_{t > j visible} (1 - beta_it)``, keys taken by descending ``kv_idx``;
computed in log space, no softmax and no position embedding needed. Here the query sees itself
(``q_idx >= kv_idx``); ``q_idx > kv_idx`` gives the strictly-previous form.

Default sizes: BATCH=2, HEADS=4, SEQ_LEN=256, HEAD_DIM=32; any length works.
Run: ``python examples/stick_breaking.py``.
"""

import attncc
from attncc.masks import causal
from attncc.testing import check_example

BATCH, HEADS, SEQ_LEN, HEAD_DIM = 2, 4, 256, 32

stick_breaking = attncc.variant(mask=causal, normalizer="stick_breaking", name="stick_breaking")


def main(backend: str | None = None) -> None:
    check_example(stick_breaking, BATCH, HEADS, SEQ_LEN, HEAD_DIM, backend=backend)


if __name__ == "__main__":
    main()
