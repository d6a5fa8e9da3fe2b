"""StreamingLLM: a few attention-sink tokens plus a causal sliding window.

Paper: Xiao, Tian, Chen, Han & Lewis, "Efficient Streaming Language Models with Attention
Sinks", ICLR 2024. Every query keeps the first SINKS tokens (the sinks) and its last WINDOW
tokens: ``attncc.masks.sinks(SINKS) | attncc.masks.sliding_window(WINDOW)``, causal.

Default sizes: BATCH=2, HEADS=4, SEQ_LEN=256, HEAD_DIM=32, SINKS=4, WINDOW=64; any length
works. Run: ``python examples/streaming_llm.py``.
"""

import torch

import attncc
from attncc import masks
from attncc.testing import check_against_reference

BATCH, HEADS, SEQ_LEN, HEAD_DIM = 2, 4, 256, 32
SINKS, WINDOW = 4, 64

streaming_mask = masks.sinks(SINKS) | masks.sliding_window(WINDOW)
streaming_llm = attncc.variant(mask=streaming_mask, name="streaming_llm")


def main(backend: str | None = None) -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(BATCH, HEADS, SEQ_LEN, HEAD_DIM, generator=gen) for _ in range(3))
    check_against_reference(streaming_llm, q, k, v, backend=backend)
    # decoding one token against the full cache: q_idx = q_offset + i
    check_against_reference(streaming_llm, q[:, :, -1:], k, v, backend=backend, q_offset=SEQ_LEN - 1)
    print(f"{streaming_mask}: ran on {streaming_llm.last_choice.backend.name}, matches the float64 reference (prefill and decode)")


if __name__ == "__main__":
    main()
