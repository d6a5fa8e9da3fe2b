"""MoBA: mixture of block attention, each query attends to its top-K key blocks only.

Paper: Lu et al., "MoBA: Mixture of Block Attention for Long-Context LLMs", 2025 (arXiv
2502.13189). Keys are cut into BLOCK-token blocks; the gate of query ``i`` for block ``J`` is
``q_i . mean(k_J)``; the TOP_K blocks with the largest gate are kept, the query's own block
always among them and future blocks never (causal, proved from the mask), and causal
attention runs on the kept blocks: ``attncc.TopKBlocks(BLOCK, TOP_K)``.

Default sizes: BATCH=2, HEADS=4, SEQ_LEN=256, HEAD_DIM=32, BLOCK=32 (8 blocks), TOP_K=3;
any length with ``TOP_K <= ceil(Lkv / BLOCK)`` works. Run: ``python examples/moba.py``.
"""

import attncc
from attncc.masks import causal
from attncc.testing import check_example

BATCH, HEADS, SEQ_LEN, HEAD_DIM = 2, 4, 256, 32
BLOCK, TOP_K = 32, 3

moba = attncc.variant(mask=causal, routing=attncc.TopKBlocks(block=BLOCK, k=TOP_K), name="moba")


def main(backend: str | None = None) -> None:
    check_example(moba, BATCH, HEADS, SEQ_LEN, HEAD_DIM, backend=backend, label=f"moba (block {BLOCK}, top {TOP_K})")


if __name__ == "__main__":
    main()
