"""ReLU attention: ``relu(s_ij) / SEQ_LEN`` in place of softmax, no row sum.

Paper: Wortsman, Lee, Gilmer & Kornblith, "Replacing softmax with ReLU in Vision Transformers",
2023 (arXiv 2309.08586): weights ``relu(s) / L`` with ``L`` the sequence length, bidirectional
as in a ViT. Written as a traced pointwise normalizer, ``attncc.Pointwise(phi, normalize=False)``.
``relu_attention_normalized`` is the row-normalized form, ``normalizer="relu"``, causal.

Default sizes: BATCH=2, HEADS=4, SEQ_LEN=256 (the divisor), HEAD_DIM=32.
Run: ``python examples/relu_attention.py``.
"""

import torch

import attncc
from attncc.masks import causal
from attncc.testing import check_example

BATCH, HEADS, SEQ_LEN, HEAD_DIM = 2, 4, 256, 32


def generate_relu_over_length(length: int):
    def relu_over_length(score):
        return torch.relu(score) / length

    return relu_over_length


relu_over_length = generate_relu_over_length(SEQ_LEN)
relu_attention = attncc.variant(
    normalizer=attncc.Pointwise(relu_over_length, normalize=False), name="relu_attention"
)
relu_attention_normalized = attncc.variant(mask=causal, normalizer="relu", name="relu_attention_normalized")


def main(backend: str | None = None) -> None:
    for var in (relu_attention, relu_attention_normalized):
        check_example(var, BATCH, HEADS, SEQ_LEN, HEAD_DIM, backend=backend)


if __name__ == "__main__":
    main()
