"""``torch.compile(backend="attncc")`` rewrites SDPA calls and matches eager torch.

The reference is torch's own SDPA run eagerly in float64 on the same inputs, independent of
attncc; ``attncc.dynamo.CALLS`` proves the attncc path ran rather than torch's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attncc import dynamo
from attncc.testing import assert_close_to_reference


class TinyAttention(torch.nn.Module):
    """A projection, then SDPA calls of the kinds a model makes: causal, plain, cross, GQA."""

    def __init__(self, dim: int = 32, heads: int = 4, kv_heads: int = 2) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = torch.nn.Linear(dim, dim)
        self.kv = torch.nn.Linear(dim, 2 * kv_heads * self.head_dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        q = self.q(x).view(B, L, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(B, L, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        mk, mv = self.kv(memory).view(B, memory.shape[1], 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        causal = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        plain = F.scaled_dot_product_attention(q, k, v, None, 0.0, False, scale=0.25, enable_gqa=True)
        # cross attention, Lq != Lkv, causal: SDPA aligns the mask top-left
        cross = F.scaled_dot_product_attention(q, mk, mv, is_causal=True, enable_gqa=True)
        return causal + plain + cross


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    dynamo.CALLS.clear()
    yield
    torch._dynamo.reset()


def inputs(L: int = 12, Lm: int = 20, dim: int = 32):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, L, dim, generator=generator), torch.randn(2, Lm, dim, generator=generator)


def test_backend_is_registered_by_name():
    assert "attncc" in torch._dynamo.list_backends(exclude_tags=())


def test_compiled_model_matches_eager_and_runs_attncc():
    model = TinyAttention()
    x, memory = inputs()
    out = torch.compile(model, backend="attncc")(x, memory)
    ref64 = model.double()(x.double(), memory.double())
    assert_close_to_reference(out, ref64, None, Lkv=memory.shape[1])
    assert dynamo.CALLS["attncc"] == 3
    assert sum(dynamo.CALLS.values()) == 3


def test_cross_attention_causal_is_top_left_aligned():
    """Lq=6 < Lkv=10: SDPA's is_causal lets query i see keys 0..i, not 0..i+4."""
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 6, 8, generator=generator)
    k, v = (torch.randn(1, 2, 10, 8, generator=generator) for _ in range(2))
    fn = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), backend="attncc")
    out = fn(q, k, v)
    ref64 = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    assert_close_to_reference(out, ref64, None, Lkv=10)
    assert dynamo.CALLS["attncc"] == 1


def test_gradients_flow_through_the_rewritten_graph():
    generator = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 9, 8, generator=generator, requires_grad=True) for _ in range(3))
    fn = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), backend="attncc")
    fn(q, k, v).square().sum().backward()
    assert dynamo.CALLS["attncc"] == 1
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    F.scaled_dot_product_attention(q64, k64, v64, is_causal=True).square().sum().backward()
    for got, want, name in ((q.grad, q64.grad, "dq"), (k.grad, k64.grad, "dk"), (v.grad, v64.grad, "dv")):
        assert_close_to_reference(got, want, None, Lkv=9, what=name, factor=2.0)


def sdpa_with_bool_mask(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def sdpa_with_dropout(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)


def sdpa_plain(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize(("fn", "expected"), [(sdpa_with_bool_mask, 0), (sdpa_with_dropout, 0), (sdpa_plain, 1)])
def test_rewrite_leaves_untranslatable_calls_alone(fn, expected):
    gm = torch.fx.symbolic_trace(fn)
    assert dynamo.rewrite_sdpa(gm) == expected
    remaining = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in dynamo.SDPA_TARGETS]
    assert len(remaining) == 1 - expected


def test_bool_mask_call_still_matches_eager_through_the_backend():
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 7, 8, generator=generator) for _ in range(3))
    mask = torch.rand(7, 7, generator=generator) > 0.3
    mask.fill_diagonal_(True)
    out = torch.compile(sdpa_with_bool_mask, backend="attncc")(q, k, v, mask)
    ref64 = sdpa_with_bool_mask(q.double(), k.double(), v.double(), mask)
    assert_close_to_reference(out, ref64, None, Lkv=7)
    assert dynamo.CALLS["attncc"] == 0


def test_inputs_attncc_cannot_take_fall_back_to_torch_at_run_time():
    """3-D inputs are valid SDPA but not an attncc layout: torch's SDPA runs them."""
    generator = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(3, 5, 8, generator=generator) for _ in range(3))
    out = torch.compile(sdpa_plain, backend="attncc")(q, k, v)
    ref64 = sdpa_plain(q.double(), k.double(), v.double())
    assert_close_to_reference(out, ref64, None, Lkv=5)
    assert dynamo.CALLS["attncc"] == 0
    assert any(key.startswith("fallback") for key in dynamo.CALLS)


def _bfloat16_reference(q, k, v, **options):
    """SDPA in float64 on the inputs as autocast rounds them to bfloat16."""
    return F.scaled_dot_product_attention(*(t.bfloat16().double() for t in (q, k, v)), **options)


def test_autocast_inside_the_compiled_function_matches_eager():
    """Autocast casts SDPA's inputs (bfloat16 on CPU); the rewritten call must do the same."""
    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 32, 16, generator=generator) for _ in range(3))

    def fn(q, k, v):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    eager = fn(q, k, v)
    out = torch.compile(fn, backend="attncc")(q, k, v)
    assert dynamo.CALLS["attncc"] == 1
    assert out.dtype == eager.dtype == torch.bfloat16
    assert_close_to_reference(out, _bfloat16_reference(q, k, v, is_causal=True), eager, Lkv=32)


def test_autocast_around_the_compiled_call_matches_eager():
    generator = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 24, 16, generator=generator) for _ in range(3))
    compiled = torch.compile(sdpa_plain, backend="attncc")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = sdpa_plain(q, k, v)
        out = compiled(q, k, v)
    assert dynamo.CALLS["attncc"] == 1
    assert out.dtype == eager.dtype == torch.bfloat16
    assert_close_to_reference(out, _bfloat16_reference(q, k, v), eager, Lkv=24)
    assert compiled(q, k, v).dtype == torch.float32  # and no casting once autocast is off


@pytest.mark.parametrize("shape", [(0, 2, 8, 16), (1, 0, 8, 16), (1, 2, 0, 16)])
def test_empty_inputs_fall_back_to_torch(shape):
    """SDPA returns an empty tensor for a zero-size dimension; so must the compiled model."""
    q = torch.randn(*shape)
    out = torch.compile(sdpa_plain, backend="attncc")(q, q, q)
    assert out.shape == sdpa_plain(q, q, q).shape
    assert dynamo.CALLS["attncc"] == 0
    assert any(key.startswith("fallback: empty") for key in dynamo.CALLS)


def _heads_back(x: torch.Tensor) -> torch.Tensor:
    """A model's attention block: heads split by view + transpose, merged back by ``view``, which
    works only on SDPA's own output layout ([B, L, H, D] in memory)."""
    B, L, _ = x.shape
    q = k = v = x.view(B, L, 4, 8).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).view(B, L, 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_output_keeps_sdpas_memory_layout(dtype: torch.dtype):
    x = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(3)).to(dtype)
    out = torch.compile(_heads_back, backend="attncc")(x)
    assert dynamo.CALLS["attncc"] == 1
    torch.testing.assert_close(out, _heads_back(x), atol=2e-2 if dtype == torch.bfloat16 else 1e-5, rtol=1e-2)


def test_sdpa_under_activation_checkpointing_and_cond_runs_attncc():
    """Checkpointed bodies and ``torch.cond`` branches are sub-graphs; SDPA there ran on torch."""
    from torch.utils.checkpoint import checkpoint

    def attention(x):
        B, L, _ = x.shape
        q = k = v = x.view(B, L, 4, 8).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, L, 32)

    x = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(4))
    for fn in (lambda t: checkpoint(attention, t, use_reentrant=False),
               lambda t: torch.cond(t.sum() > 0, attention, lambda u: attention(u * 2), (t,))):
        torch._dynamo.reset()
        dynamo.CALLS.clear()
        leaf = x.clone().requires_grad_()
        out = torch.compile(fn, backend="attncc")(leaf)
        out.square().sum().backward()
        eager_leaf = x.clone().requires_grad_()
        fn(eager_leaf).square().sum().backward()
        assert dynamo.CALLS["attncc"] >= 1, dict(dynamo.CALLS)
        torch.testing.assert_close(out, fn(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(leaf.grad, eager_leaf.grad, atol=1e-4, rtol=1e-4)


def test_a_variant_called_inside_a_compiled_function_is_one_opaque_call():
    """Dynamo traced into a variant's caches and TVM calls (dozens of graphs, slower calls) and
    failed on a sink's frozen payloads; a variant call is now a graph break that runs eagerly."""
    from torch._dynamo.utils import counters

    import attncc
    from attncc import masks

    counters.clear()
    sink = torch.zeros(2, requires_grad=True)
    program = attncc.variant(mask=masks.causal, normalizer=attncc.Softmax(sink=sink))
    q, k, v = (torch.randn(1, 2, 20, 16, generator=torch.Generator().manual_seed(5)).requires_grad_()
               for _ in range(3))
    out = torch.compile(lambda q, k, v: program(q, k, v) * 2, backend="attncc")(q, k, v)
    torch.testing.assert_close(out, program(q, k, v) * 2, atol=0, rtol=0)
    assert counters["stats"]["unique_graphs"] <= 2
    out.sum().backward()
    assert sink.grad is not None and torch.isfinite(sink.grad).all()


def test_importing_attncc_does_not_import_dynamo():
    """``torch.compiler.disable`` imports ``torch._dynamo`` (1.6 s); the variant calls ask for it
    only once dynamo is loaded (``attncc.opaque``)."""
    import subprocess
    import sys

    code = "import sys, attncc; print('torch._dynamo' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
