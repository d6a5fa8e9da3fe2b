"""ALiBi: attention with linear biases, a per-head penalty proportional to the distance.

Paper: Press, Smith & Lewis, "Train Short, Test Long: Attention with Linear Biases Enables
Input Length Extrapolation", ICLR 2022. Head ``h`` of ``H`` has slope ``2 ** (-8 (h + 1) / H)``
and adds ``-slope_h * (q_idx - kv_idx)`` to the score; causal.

Captured: ``slopes [HEADS]`` (float32). Default sizes: BATCH=2, HEADS=4, SEQ_LEN=256,
HEAD_DIM=32; any length works. Run: ``python examples/alibi.py``.
"""

import torch

import attncc
from attncc.masks import causal
from attncc.testing import check_example

BATCH, HEADS, SEQ_LEN, HEAD_DIM = 2, 4, 256, 32


def generate_alibi_bias(heads: int):
    slopes = torch.tensor([2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)])

    def alibi_bias(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx)

    return alibi_bias


alibi_bias = generate_alibi_bias(HEADS)
alibi = attncc.variant(alibi_bias, mask=causal, name="alibi")


def main(backend: str | None = None) -> None:
    check_example(alibi, BATCH, HEADS, SEQ_LEN, HEAD_DIM, backend=backend)


if __name__ == "__main__":
    main()
