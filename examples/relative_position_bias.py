"""Learned relative position bias: a per-head table indexed by the query-key offset.

Papers: Shaw, Uszkoreit & Vaswani, "Self-Attention with Relative Position Representations",
NAACL 2018; Raffel et al. (T5), JMLR 2020 (a learned scalar bias per head and offset). The
score gets ``table[h, q_idx - kv_idx + MAX_LEN - 1]``: one entry per offset in
``(-MAX_LEN, MAX_LEN)`` (T5's log buckets would be a captured lookup too). Bidirectional.

Captured: ``bias_table [HEADS, 2 * MAX_LEN - 1]`` (float32, seeded). Default sizes: BATCH=2,
HEADS=4, SEQ_LEN=MAX_LEN=256, HEAD_DIM=32; lengths up to MAX_LEN work.
Run: ``python examples/relative_position_bias.py``.
"""

import torch

import attncc
from attncc.testing import check_example

BATCH, HEADS, SEQ_LEN, HEAD_DIM = 2, 4, 256, 32
MAX_LEN = SEQ_LEN


def generate_relative_bias(table: torch.Tensor, max_len: int):
    def relative_bias(score, b, h, q_idx, kv_idx):
        return score + table[h, q_idx - kv_idx + max_len - 1]

    return relative_bias


bias_table = torch.randn(HEADS, 2 * MAX_LEN - 1, generator=torch.Generator().manual_seed(1))
relative_bias = generate_relative_bias(bias_table, MAX_LEN)
relative_position_bias = attncc.variant(relative_bias, name="relative_position_bias")


def main(backend: str | None = None) -> None:
    check_example(relative_position_bias, BATCH, HEADS, SEQ_LEN, HEAD_DIM, backend=backend)


if __name__ == "__main__":
    main()
