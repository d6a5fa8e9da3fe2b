"""Linear attention with the elu+1 feature map: ``phi(q_i).phi(k_j)`` in place of ``exp(q.k)``.

Paper: Katharopoulos, Vyas, Pappas & Fleuret, "Transformers are RNNs: Fast Autoregressive
Transformers with Linear Attention", ICML 2020. ``phi(x) = elu(x) + 1``, weights divided by
their row sum; with a causal mask attncc lowers it to a chunked recurrence of cost O(L).
``linear_attention_bidirectional`` is the unmasked (encoder) form.

Default sizes: BATCH=2, HEADS=4, SEQ_LEN=256, HEAD_DIM=32; any length works.
Run: ``python examples/linear_attention.py``.
"""

import attncc
from attncc.masks import causal
from attncc.testing import check_example

BATCH, HEADS, SEQ_LEN, HEAD_DIM = 2, 4, 256, 32

linear_attention = attncc.variant(mask=causal, normalizer=attncc.Linear("elu1"), name="linear_attention")
linear_attention_bidirectional = attncc.variant(
    normalizer=attncc.Linear("elu1"), name="linear_attention_bidirectional"
)


def main(backend: str | None = None) -> None:
    for var in (linear_attention, linear_attention_bidirectional):
        check_example(var, BATCH, HEADS, SEQ_LEN, HEAD_DIM, backend=backend)


if __name__ == "__main__":
    main()
