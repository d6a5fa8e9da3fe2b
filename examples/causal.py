"""Causal (autoregressive) attention: each query sees itself and the keys before it.

Paper: Vaswani et al., "Attention Is All You Need", NeurIPS 2017 (the decoder's masked
self-attention). ``main()`` runs it with grouped-query attention (Ainslie et al., "GQA",
EMNLP 2023): 4 query heads share 2 key/value heads.

Default sizes: BATCH=2, HEADS=4, SEQ_LEN=256, HEAD_DIM=32; nothing is captured, so any
length works. Run: ``python examples/causal.py``.
"""

import torch

import attncc
from attncc.testing import check_against_reference

BATCH, HEADS, KV_HEADS, SEQ_LEN, HEAD_DIM = 2, 4, 2, 256, 32


def causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


causal = attncc.variant(mask=causal_mask, name="causal")


def main(backend: str | None = None) -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(BATCH, HEADS, SEQ_LEN, HEAD_DIM, generator=gen)
    k, v = (torch.randn(BATCH, KV_HEADS, SEQ_LEN, HEAD_DIM, generator=gen) for _ in range(2))
    check_against_reference(causal, q, k, v, backend=backend)
    print(f"causal (GQA {HEADS}:{KV_HEADS}): ran on {causal.last_choice.backend.name}, matches the float64 reference")


if __name__ == "__main__":
    main()
