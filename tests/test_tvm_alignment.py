"""Tensors at any address: contiguous views whose data is not 64-byte aligned (q, k, v unbound
from one packed tensor, a slice of a cache, NumPy's memory) run on the TVM backend, copied where a
kernel's buffer assumes alignment. They had segfaulted: TVM moves vectors with aligned
instructions. Each case is checked against the reference backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("tvm")

import attncc
from attncc import masks
from attncc.codegen.tvm import launcher
from attncc.testing import check_against_reference, random_qkv

pytestmark = pytest.mark.usefixtures("tvm_cache_dir")


def shifted(t: torch.Tensor, elements: int = 1) -> torch.Tensor:
    """A contiguous copy of ``t`` that starts ``elements`` past an aligned address."""
    storage = torch.empty(t.numel() + elements, dtype=t.dtype)
    out = storage[elements:].view(t.shape)
    out.copy_(t)
    assert out.is_contiguous() and out.data_ptr() % launcher.KERNEL_ALIGNMENT
    return out


@pytest.mark.parametrize("which", ["q", "k", "v", "all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_with_unaligned_inputs(which: str, dtype: torch.dtype) -> None:
    q, k, v = random_qkv(B=1, Hq=4, Hkv=2, Lq=70, Lkv=70, D=32, dtype=dtype)
    ops = {"q": q, "k": k, "v": v}
    for name in ops:
        if which in (name, "all"):
            ops[name] = shifted(ops[name], 1 if name != "k" else 2)  # an even offset too (bfloat16 words)
    check_against_reference(attncc.variant(mask=masks.causal), ops["q"], ops["k"], ops["v"], backend="tvm",
                            return_lse=True)


def test_unbound_packed_qkv_of_an_odd_shape() -> None:
    """The realistic case: ``qkv.unbind(0)`` of ``[3, B, H, L, D]`` whose ``B H L D`` is no
    multiple of 32 bfloat16 values starts k and v off the 64-byte grid."""
    qkv = torch.randn(3, 1, 1, 7, 48).bfloat16()
    q, k, v = qkv.unbind(0)
    assert k.data_ptr() % launcher.KERNEL_ALIGNMENT
    check_against_reference(attncc.variant(), q, k, v, backend="tvm")


def test_unaligned_captured_tensors() -> None:
    """A float bias table and integer document ids, each at an odd offset of its storage."""
    L = 70
    bias = shifted(torch.randn(4, L))
    ids = shifted(torch.tensor([0] * 30 + [1] * 25 + [2] * 15))
    var = attncc.variant(lambda s, b, h, q, kv: s + bias[h, kv], mask=masks.document(ids))
    q, k, v = random_qkv(B=1, Hq=4, Hkv=2, Lq=L, Lkv=L, D=32)
    check_against_reference(var, q, k, v, backend="tvm")


def test_numpy_memory() -> None:
    """``torch.from_numpy`` keeps NumPy's allocation, aligned to 16 bytes only at times."""
    q, k, v = random_qkv(B=1, Hq=2, Hkv=2, Lq=40, Lkv=40, D=16)
    arrays = [np.empty(t.numel() + 1, dtype=np.float32)[1:].reshape(t.shape) for t in (q, k, v)]
    for a, t in zip(arrays, (q, k, v), strict=True):
        a[...] = t.numpy()
        assert torch.from_numpy(a).data_ptr() % launcher.KERNEL_ALIGNMENT
    check_against_reference(attncc.variant(mask=masks.causal), *(torch.from_numpy(a) for a in arrays), backend="tvm")


def test_decoding_step_over_an_unaligned_cache_slice() -> None:
    """A decoding step reads a slice of its cache in place; a slice starting off the grid is
    copied instead."""
    q, k, v = random_qkv(B=1, Hq=8, Hkv=2, Lq=1, Lkv=600, D=40)
    cache_k, cache_v = torch.randn(1, 2, 700, 40), torch.randn(1, 2, 700, 40)
    cache_k[:, :, 3:603], cache_v[:, :, 3:603] = k, v
    ks, vs = cache_k[:, :, 3:603], cache_v[:, :, 3:603]
    assert ks.data_ptr() % launcher.KERNEL_ALIGNMENT
    check_against_reference(attncc.variant(mask=masks.causal), q, ks, vs, backend="tvm", q_offset=599,
                            return_lse=True)


@pytest.mark.parametrize("normalizer", ["softmax", "linear"])
def test_gradients_of_unaligned_inputs_and_output_gradient(normalizer: str) -> None:
    kwargs = {"normalizer": attncc.Linear()} if normalizer == "linear" else {}
    var = attncc.variant(mask=masks.causal, **kwargs)
    q, k, v = random_qkv(B=1, Hq=2, Hkv=2, Lq=40, Lkv=40, D=16)
    grad_out = torch.randn(1, 2, 40, 16)
    grads = {}
    for backend in ("tvm", "reference"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        inputs = [shifted(t) if backend == "tvm" else t for t in leaves]
        out = var(*inputs, backend=backend)
        out.backward(shifted(grad_out) if backend == "tvm" else grad_out)
        grads[backend] = [t.grad for t in leaves]
    for got, want in zip(grads["tvm"], grads["reference"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
