"""Sparse Transformers' strided pattern: a local window plus every STRIDE-th earlier key.

Paper: Child, Gray, Radford & Sutskever, "Generating Long Sequences with Sparse Transformers",
2019, Section 4.2. The paper factorizes attention over two heads, ``A1 = {max(0, i - l) .. i}``
and ``A2 = {j : (i - j) mod l = 0}``; this mask is their union (one head sees both), causal,
the same as ``attncc.masks.strided(l)``. ``attncc.masks.fixed(l, c)`` is the paper's other pattern.

Default sizes: BATCH=2, HEADS=4, SEQ_LEN=256, HEAD_DIM=32, STRIDE=16 (about sqrt(SEQ_LEN));
any length works. Run: ``python examples/strided.py``.
"""

import attncc
from attncc.testing import check_example

BATCH, HEADS, SEQ_LEN, HEAD_DIM = 2, 4, 256, 32
STRIDE = 16


def generate_strided_mask(stride: int):
    def strided_mask(b, h, q_idx, kv_idx):
        distance = q_idx - kv_idx
        local = distance < stride
        summary = distance % stride == 0
        return (q_idx >= kv_idx) & (local | summary)

    return strided_mask


strided_mask = generate_strided_mask(STRIDE)
strided = attncc.variant(mask=strided_mask, name="strided")


def main(backend: str | None = None) -> None:
    check_example(strided, BATCH, HEADS, SEQ_LEN, HEAD_DIM, backend=backend, label=f"strided({STRIDE})")


if __name__ == "__main__":
    main()
