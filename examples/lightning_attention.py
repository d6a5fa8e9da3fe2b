"""Lightning-style linear attention with a per-head exponential decay (retention).

Papers: Qin et al., "Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence
Lengths in Large Language Models", 2024; Sun et al., "Retentive Network: A Successor to
Transformer for Large Language Models" (RetNet), 2023. Weights ``(q_i . k_j) * decay_h **
(q_idx - kv_idx)``, causal, identity feature map, no row normalization (the models normalize
the output afterwards). Decays are RetNet's ``1 - 2 ** (-5 - h)``. attncc runs it as a chunked
recurrence: O(L) instead of O(L^2).

Captured: ``decay [HEADS]`` (float32). Default sizes: BATCH=2, HEADS=4, SEQ_LEN=256,
HEAD_DIM=32; any length works. Run: ``python examples/lightning_attention.py``.
"""

import torch

import attncc
from attncc.masks import causal
from attncc.testing import check_example

BATCH, HEADS, SEQ_LEN, HEAD_DIM = 2, 4, 256, 32

decay = 1.0 - 2.0 ** (-5.0 - torch.arange(HEADS, dtype=torch.float32))
lightning_attention = attncc.variant(
    mask=causal,
    normalizer=attncc.Linear("identity", normalize=False, decay=decay),
    name="lightning_attention",
)


def main(backend: str | None = None) -> None:
    check_example(lightning_attention, BATCH, HEADS, SEQ_LEN, HEAD_DIM, backend=backend)


if __name__ == "__main__":
    main()
