"""Prefix LM: bidirectional attention over a prefix, causal attention after it.

Paper: Raffel et al., "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
Transformer" (T5), JMLR 2020, Section 3.2.1 ("prefix LM"). Every query sees the first PREFIX
keys (``kv_idx < PREFIX``) and, causally, the rest; ``attncc.masks.prefix_lm(PREFIX)``.

Default sizes: BATCH=2, HEADS=4, SEQ_LEN=256, HEAD_DIM=32, PREFIX=64; any length works.
Run: ``python examples/prefix_lm.py``.
"""

import attncc
from attncc.testing import check_example

BATCH, HEADS, SEQ_LEN, HEAD_DIM = 2, 4, 256, 32
PREFIX = 64


def generate_prefix_lm_mask(prefix_length: int):
    def prefix_lm_mask(b, h, q_idx, kv_idx):
        return (kv_idx < prefix_length) | (q_idx >= kv_idx)

    return prefix_lm_mask


prefix_lm_mask = generate_prefix_lm_mask(PREFIX)
prefix_lm = attncc.variant(mask=prefix_lm_mask, name="prefix_lm")


def main(backend: str | None = None) -> None:
    check_example(prefix_lm, BATCH, HEADS, SEQ_LEN, HEAD_DIM, backend=backend, label=f"prefix_lm({PREFIX})")


if __name__ == "__main__":
    main()
