"""Block-local (chunked) causal attention: queries see only earlier keys of their own chunk.

Papers: Parmar et al., "Image Transformer", ICML 2018 (local 1-D attention over query blocks);
Meta's Llama 4 (2025) interleaves such chunked-attention layers (chunks of 8192 tokens) with
global ones. Mask ``q_idx // CHUNK == kv_idx // CHUNK`` and causal, i.e.
``attncc.masks.chunked(CHUNK) & attncc.masks.causal``.

Default sizes: BATCH=2, HEADS=4, SEQ_LEN=256, HEAD_DIM=32, CHUNK=64; any length works.
Run: ``python examples/chunked_attention.py``.
"""

import torch

import attncc
from attncc.testing import check_against_reference

BATCH, HEADS, SEQ_LEN, HEAD_DIM = 2, 4, 256, 32
CHUNK = 64


def generate_chunked_causal(chunk: int):
    def chunked_causal(b, h, q_idx, kv_idx):
        same_chunk = q_idx // chunk == kv_idx // chunk
        return same_chunk & (q_idx >= kv_idx)

    return chunked_causal


chunked_causal = generate_chunked_causal(CHUNK)
chunked_attention = attncc.variant(mask=chunked_causal, name="chunked_attention")


def main(backend: str | None = None) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(BATCH, HEADS, SEQ_LEN, HEAD_DIM, generator=gen) for _ in range(3))
    check_against_reference(chunked_attention, q, k, v, backend=backend)
    print(f"chunked_attention({CHUNK}): ran on {chunked_attention.last_choice.backend.name}, matches the float64 reference")


if __name__ == "__main__":
    main()
