"""Differential attention: the difference of two softmax attentions cancels common noise.

Paper: Ye et al., "Differential Transformer", ICLR 2025 (arXiv 2410.05258):
``o = softmax(q1 k1^T) v - lambda * softmax(q2 k2^T) v``, causal. The paper's learned
re-parameterized lambda, per-head GroupNorm and ``(1 - lambda_init)`` factor act outside
attention and are left out. Built as one graph of two attention nodes and a combine node with
``attncc.GraphBuilder`` (see ``attncc/compose.py``); attncc fuses it to read each ``v`` tile once.

Default sizes: BATCH=2, HEADS=4, SEQ_LEN=256, HEAD_DIM=32, LAMBDA=0.8; any length works.
Call with every input by keyword. Run: ``python examples/differential_attention.py``.
"""

import torch

import attncc
from attncc.masks import causal
from attncc.testing import assert_close_to_reference, reference_outputs

BATCH, HEADS, SEQ_LEN, HEAD_DIM = 2, 4, 256, 32
LAMBDA = 0.8


def build_differential_attention(mask=causal) -> attncc.ComposedProgram:
    g = attncc.GraphBuilder("differential_attention")
    q1, k1, q2, k2, v = g.inputs("q1", "k1", "q2", "k2", "v")
    lam = g.scalar("lam")
    o1 = g.attention(q1, k1, v, mask=mask)
    o2 = g.attention(q2, k2, v, mask=mask)
    return g.build(o1 - lam * o2)


differential_attention = build_differential_attention()


def main(backend: str | None = None) -> None:
    gen = torch.Generator().manual_seed(0)
    names = ("q1", "k1", "q2", "k2", "v")
    inputs = {n: torch.randn(BATCH, HEADS, SEQ_LEN, HEAD_DIM, generator=gen) for n in names}
    out = differential_attention(**inputs, lam=torch.tensor(LAMBDA), backend=backend)
    ref64, _ = reference_outputs(differential_attention, inputs)
    assert_close_to_reference(out, ref64, None, SEQ_LEN)
    choice = differential_attention.last_choice.backend.name
    print(f"differential_attention (lambda {LAMBDA}): ran on {choice}, matches the float64 reference")


if __name__ == "__main__":
    main()
