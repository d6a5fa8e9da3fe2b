"""Logit soft-capping: scores squashed smoothly into (-CAP, CAP) with tanh.

Paper: Gemma Team, "Gemma 2: Improving Open Language Models at a Practical Size", 2024
(attention logits capped at 50 with ``cap * tanh(score / cap)``); the tanh clipping goes back to
Bello et al., "Neural Combinatorial Optimization with Reinforcement Learning", 2016. Causal.

Default sizes: BATCH=2, HEADS=4, SEQ_LEN=256, HEAD_DIM=32, CAP=20.0 (small enough that the
cap bites on random inputs); any length works. Run: ``python examples/softcapping.py``.
"""

import torch

import attncc
from attncc.masks import causal
from attncc.testing import check_against_reference

BATCH, HEADS, SEQ_LEN, HEAD_DIM = 2, 4, 256, 32
CAP = 20.0


def generate_tanh_softcap(cap: float):
    def tanh_softcap(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    return tanh_softcap


tanh_softcap = generate_tanh_softcap(CAP)
softcapping = attncc.variant(tanh_softcap, mask=causal, name="softcapping")


def main(backend: str | None = None) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(BATCH, HEADS, SEQ_LEN, HEAD_DIM, generator=gen) for _ in range(3))
    # a large scale makes some raw scores exceed CAP, so the tanh matters
    check_against_reference(softcapping, q, k, v, backend=backend, scale=4.0)
    print(f"softcapping({CAP}): ran on {softcapping.last_choice.backend.name}, matches the float64 reference")


if __name__ == "__main__":
    main()
