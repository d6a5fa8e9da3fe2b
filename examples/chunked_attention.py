"""Block-local (chunked) causal attention: queries see only earlier keys of their own chunk.

Papers: Parmar et al., "Image Transformer", ICML 2018 (local 1-D attention over query blocks);
Meta's Llama 4 (2025) interleaves such chunked-attention layers (chunks of 8192 tokens) with
global ones. Mask ``q_idx // CHUNK == kv_idx // CHUNK`` and causal, i.e.
``attncc.masks.chunked(CHUNK) & attncc.masks.causal``.

Default sizes: BATCH=2, HEADS=4, SEQ_LEN=256, HEAD_DIM=32, CHUNK=64; any length works.
Run: ``python examples/chunked_attention.py``.
"""

import attncc
from attncc.testing import check_example

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
    check_example(chunked_attention, BATCH, HEADS, SEQ_LEN, HEAD_DIM, backend=backend, label=f"chunked_attention({CHUNK})")


if __name__ == "__main__":
    main()
