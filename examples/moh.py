"""MoH: mixture-of-head attention, each token uses only its top-K heads.

Paper: Jin, Zhu, Yan & Yuan, "MoH: Multi-Head Attention as Mixture-of-Head Attention", 2024
(arXiv 2410.11842). A router gives each token a logit per head; the token keeps its TOP_K heads
and weights their outputs by the softmax over the kept logits; other heads' outputs are zero
and never computed. attncc simplifies the paper (no shared heads): ``attncc.TopKHeads``.

Captured: ``router_logits [BATCH, SEQ_LEN, HEADS]`` (float32, seeded; in a model they are the
token states times a router matrix). Default sizes: BATCH=2, HEADS=4, SEQ_LEN=256 (fixed by the
router), HEAD_DIM=32, TOP_K=2, causal. Run: ``python examples/moh.py``.
"""

import torch

import attncc
from attncc.masks import causal
from attncc.testing import check_example

BATCH, HEADS, SEQ_LEN, HEAD_DIM = 2, 4, 256, 32
TOP_K = 2

router_logits = torch.randn(BATCH, SEQ_LEN, HEADS, generator=torch.Generator().manual_seed(3))
moh = attncc.variant(mask=causal, routing=attncc.TopKHeads(TOP_K, router_logits), name="moh")


def main(backend: str | None = None) -> None:
    check_example(moh, BATCH, HEADS, SEQ_LEN, HEAD_DIM, backend=backend, label=f"moh (top {TOP_K} of {HEADS} heads)")


if __name__ == "__main__":
    main()
