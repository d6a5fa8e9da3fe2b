"""Document masking: packed sequences attend causally within their own document only.

Paper: Krell et al., "Efficient Sequence Packing without Cross-contamination: Accelerating
Large Language Models without Impacting Performance", 2021 (packing several documents into one
row and masking across them); the FlexAttention "document masking" recipe.

Captured: ``document_ids [SEQ_LEN]`` (int32, document of each position), built from a seeded
generator: N_DOCS documents of random lengths summing to SEQ_LEN. Default sizes: BATCH=2,
HEADS=4, SEQ_LEN=256, HEAD_DIM=32, N_DOCS=5; lengths up to SEQ_LEN work.
Run: ``python examples/document_masking.py``.
"""

import torch

import attncc
from attncc.testing import check_example

BATCH, HEADS, SEQ_LEN, HEAD_DIM = 2, 4, 256, 32
N_DOCS = 5


def random_document_ids(length: int, documents: int, seed: int = 0) -> torch.Tensor:
    """Document id per position for ``documents`` contiguous documents of random lengths."""
    gen = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(length - 1, generator=gen)[: documents - 1] + 1
    starts = torch.zeros(length, dtype=torch.int32)
    starts[cuts] = 1
    return torch.cumsum(starts, 0).to(torch.int32)


def generate_doc_mask_mod(document_ids: torch.Tensor):
    def document_causal_mask(b, h, q_idx, kv_idx):
        same_document = document_ids[q_idx] == document_ids[kv_idx]
        return same_document & (q_idx >= kv_idx)

    return document_causal_mask


document_ids = random_document_ids(SEQ_LEN, N_DOCS)
document_causal_mask = generate_doc_mask_mod(document_ids)
document_masking = attncc.variant(mask=document_causal_mask, name="document_masking")


def main(backend: str | None = None) -> None:
    sizes = torch.bincount(document_ids).tolist()
    check_example(document_masking, BATCH, HEADS, SEQ_LEN, HEAD_DIM, backend=backend, label=f"document_masking (documents {sizes})")


if __name__ == "__main__":
    main()
