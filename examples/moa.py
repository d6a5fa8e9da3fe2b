"""MoA: mixture of sparse attention, a different causal window for every head.

Paper: Fu et al., "MoA: Mixture of Sparse Attention for Automatic Large Language Model
Compression", 2024 (arXiv 2406.14909): heads get heterogeneous sliding-window spans found by a
profiler. The span is a captured per-head tensor, ``q_idx - kv_idx < windows[h]``, causal; one
compiled kernel serves every head (the sparsity pass bounds each head's key range).

Captured: ``windows [HEADS]`` (int32, (16, 32, 64, 256)). Default sizes: BATCH=2, HEADS=4,
SEQ_LEN=256, HEAD_DIM=32; any length works. Run: ``python examples/moa.py``.
"""

import torch

import attncc
from attncc.testing import check_example

BATCH, HEADS, SEQ_LEN, HEAD_DIM = 2, 4, 256, 32


def generate_moa_mask(windows: torch.Tensor):
    def moa_mask(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < windows[h])

    return moa_mask


windows = torch.tensor([16, 32, 64, 256], dtype=torch.int32)
moa_mask = generate_moa_mask(windows)
moa = attncc.variant(mask=moa_mask, name="moa")


def main(backend: str | None = None) -> None:
    check_example(moa, BATCH, HEADS, SEQ_LEN, HEAD_DIM, backend=backend, label=f"moa (windows {windows.tolist()})")


if __name__ == "__main__":
    main()
