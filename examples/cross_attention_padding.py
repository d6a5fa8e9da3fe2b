"""Cross attention over padded key batches: queries ignore each batch row's padding keys.

Paper: Vaswani et al., "Attention Is All You Need", NeurIPS 2017 (encoder-decoder attention;
padded batches mask positions past each source's length). Queries and keys have different
lengths (``Lq != Lkv``); batch row ``b`` has ``kv_lengths[b]`` real keys: ``kv_idx <
kv_lengths[b]``, captured like FlexAttention users capture it.

Captured: ``kv_lengths [BATCH]`` (int64). Default sizes: BATCH=2, HEADS=4, Q_LEN=96,
KV_LEN=256, HEAD_DIM=32, lengths (256, 173). Run: ``python examples/cross_attention_padding.py``.
"""

import torch

import attncc
from attncc.testing import check_against_reference

BATCH, HEADS, Q_LEN, KV_LEN, HEAD_DIM = 2, 4, 96, 256, 32
SEQ_LEN = KV_LEN


def generate_padding_mask(lengths: torch.Tensor):
    def key_padding(b, h, q_idx, kv_idx):
        return kv_idx < lengths[b]

    return key_padding


kv_lengths = torch.tensor([KV_LEN, 173])
key_padding = generate_padding_mask(kv_lengths)
cross_attention_padding = attncc.variant(mask=key_padding, name="cross_attention_padding")


def main(backend: str | None = None) -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(BATCH, HEADS, Q_LEN, HEAD_DIM, generator=gen)
    k, v = (torch.randn(BATCH, HEADS, KV_LEN, HEAD_DIM, generator=gen) for _ in range(2))
    check_against_reference(cross_attention_padding, q, k, v, backend=backend)
    choice = cross_attention_padding.last_choice.backend.name
    print(f"cross_attention_padding (Lq={Q_LEN}, Lkv={KV_LEN}, lengths {kv_lengths.tolist()}): ran on {choice}, matches the reference")


if __name__ == "__main__":
    main()
