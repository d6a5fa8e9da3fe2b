"""Every example against torch's own FlexAttention, and every example's ``main()``.

FlexAttention is an independent oracle for the score and mask functions in ``examples/``: the
same Python functions go unchanged into ``create_block_mask`` / ``flex_attention`` (run eagerly
on the CPU in float64) and into attncc (traced, run on the reference backend in float32), and
the outputs must agree within SEMANTICS.md's float32 tolerance. Where attncc computes something
FlexAttention cannot (learned sinks, MoBA and MoH routing) the test adds the missing piece
itself from SEMANTICS.md's formulas; variants whose normalizer is not softmax are checked
through a softmax twin with the same score and mask, and through their ``main()``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import attncc  # noqa: E402
import examples  # noqa: E402
from attncc import masks  # noqa: E402
from attncc.normalizers import Softmax  # noqa: E402
from attncc.testing import assert_close_to_reference  # noqa: E402
from attncc.variant import Variant  # noqa: E402

PROGRAMS = examples.load_variants()
VARIANTS = {name: p for name, p in PROGRAMS.items() if isinstance(p, Variant)}
BATCH, HEADS, HEAD_DIM = 2, 4, 16

# (Lq, Lkv, Hkv): odd lengths, lengths past one 128-tile, GQA 2:1 and MQA, and Lq != Lkv
SHAPES = [(64, 64, 4), (97, 97, 2), (130, 130, 1), (70, 130, 2)]
# examples whose captured tensors fix the sequence length
FIXED_LENGTH = {"neighborhood_2d": 256, "moh": 256}


def parts(var: Variant) -> tuple:
    """(score_fn, mask, normalizer, routing) the variant was declared with."""
    return var.score_fn, var.mask, var.normalizer, var.routing


def shapes_for(name: str) -> list[tuple[int, int, int]]:
    example = name.split(":")[0]
    if example in FIXED_LENGTH:
        L = FIXED_LENGTH[example]
        return [(L, L, 4), (L, L, 2)]
    return SHAPES


def random_qkv(Lq: int, Lkv: int, Hkv: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(BATCH, HEADS, Lq, HEAD_DIM, generator=gen)
    k, v = (torch.randn(BATCH, Hkv, Lkv, HEAD_DIM, generator=gen) for _ in range(2))
    return q, k, v


def flex64(q, k, v, score_fn=None, mask=None, return_lse=False):
    """FlexAttention in float64 on the CPU: the oracle for softmax attention."""
    B, H, Lq, _ = q.shape
    Lkv = k.shape[2]
    block_mask = None if mask is None else create_block_mask(mask, B, H, Lq, Lkv, device="cpu")
    out = flex_attention(
        q.double(), k.double(), v.double(), score_mod=score_fn, block_mask=block_mask,
        enable_gqa=k.shape[1] != H, return_aux=AuxRequest(lse=True) if return_lse else None,
    )
    return (out[0], out[1].lse) if return_lse else out


def is_plain_softmax(normalizer) -> bool:
    return normalizer == "softmax" or (isinstance(normalizer, Softmax) and normalizer.sink is None)


def kind_of(var: Variant) -> str:
    _, _, normalizer, routing = parts(var)
    if routing is not None:
        return "routing"
    if is_plain_softmax(normalizer):
        return "softmax"
    return "sink" if isinstance(normalizer, Softmax) else "other"


def cases(kind: str) -> list:
    names = [name for name, var in VARIANTS.items() if kind_of(var) == kind]
    return [pytest.param(n, s, id=f"{n}-{s[0]}x{s[1]}-hkv{s[2]}") for n in names for s in shapes_for(n)]


# ---- softmax variants: attncc == flex_attention with the very same functions -------------------


@pytest.mark.parametrize(("name", "shape"), cases("softmax"))
def test_softmax_example_matches_flex_attention(name, shape):
    var = VARIANTS[name]
    score_fn, mask, _, _ = parts(var)
    q, k, v = random_qkv(*shape)
    out, lse = var(q, k, v, backend="reference", return_lse=True)
    expected, expected_lse = flex64(q, k, v, score_fn, mask, return_lse=True)
    assert_close_to_reference(out, expected, None, shape[1])
    assert_close_to_reference(lse.double(), expected_lse, None, shape[1], what="lse")


@pytest.mark.parametrize(("name", "shape"), cases("sink"))
def test_sink_example_matches_flex_attention_plus_sink(name, shape):
    """Softmax(sink): o = o_flex * Z / (Z + e^sink) = o_flex * sigmoid(lse_flex - sink_h)."""
    var = VARIANTS[name]
    score_fn, mask, normalizer, _ = parts(var)
    q, k, v = random_qkv(*shape)
    out, lse = var(q, k, v, backend="reference", return_lse=True)
    flex_out, flex_lse = flex64(q, k, v, score_fn, mask, return_lse=True)
    sink = normalizer.sink.double().view(1, HEADS, 1)
    expected = flex_out * torch.sigmoid(flex_lse - sink).unsqueeze(-1)
    expected_lse = torch.logaddexp(flex_lse, sink.expand_as(flex_lse))
    assert_close_to_reference(out, expected, None, shape[1])
    assert_close_to_reference(lse.double(), expected_lse, None, shape[1], what="lse")


@pytest.mark.parametrize(("name", "shape"), cases("other"))
def test_non_softmax_example_masks_match_flex_via_softmax_twin(name, shape):
    """No FlexAttention form for these normalizers: check their score and mask under softmax."""
    score_fn, mask, _, _ = parts(VARIANTS[name])
    twin = attncc.variant(score_fn, mask=mask, name=f"{name}_softmax_twin")
    q, k, v = random_qkv(*shape)
    out = twin(q, k, v, backend="reference")
    assert_close_to_reference(out, flex64(q, k, v, score_fn, mask), None, shape[1])


def test_every_example_variant_is_covered():
    """A new example must land in one of the checks above (or in the routing/combined ones)."""
    covered = {p.values[0] for kind in ("softmax", "sink", "other") for p in cases(kind)}
    routed = {n for n, v in VARIANTS.items() if kind_of(v) == "routing"}
    assert covered | routed == set(VARIANTS)
    assert routed == {"moba", "moh"}, "a new routed example needs its own flex check below"
    assert set(PROGRAMS) - set(VARIANTS) == {"differential_attention"}


# ---- routing: the selection rebuilt from SEMANTICS.md, attention by flex ----------------------


def moba_selection(q: torch.Tensor, k: torch.Tensor, block: int, top_k: int) -> torch.Tensor:
    """[B, Hq, Lq, nblocks] bool: MoBA's causal block choice per SEMANTICS.md (q_offset = 0)."""
    _, H, Lq, _ = q.shape
    Lkv = k.shape[2]
    k = k.double().repeat_interleave(H // k.shape[1], dim=1)
    nblocks = math.ceil(Lkv / block)
    means = torch.stack([k[:, :, j * block : (j + 1) * block].mean(2) for j in range(nblocks)], dim=2)
    gate = q.double() @ means.transpose(-1, -2)
    i = torch.arange(Lq).view(Lq, 1)
    j = torch.arange(nblocks).view(1, nblocks)
    eligible = j * block <= i
    own = j == i // block
    ranked = gate.masked_fill(~eligible, -math.inf).masked_fill(own, math.inf)
    order = torch.argsort(ranked, dim=-1, descending=True, stable=True)[..., :top_k]
    chosen = torch.zeros_like(gate, dtype=torch.bool).scatter(-1, order, True)
    return chosen & eligible


@pytest.mark.parametrize("shape", [(97, 97, 2), (130, 130, 4), (130, 130, 1)])
def test_moba_matches_flex_with_independent_block_selection(shape):
    var = examples.load_module("moba").moba
    _, mask, _, routing = parts(var)
    q, k, v = random_qkv(*shape)
    selected = moba_selection(q, k, routing.block, routing.k)
    block = routing.block

    def routed(b, h, q_idx, kv_idx):
        return selected[b, h, q_idx, kv_idx // block] & mask(b, h, q_idx, kv_idx)

    out = var(q, k, v, backend="reference")
    assert_close_to_reference(out, flex64(q, k, v, None, routed), None, shape[1])


def moh_weights(router: torch.Tensor, top_k: int) -> torch.Tensor:
    """[B, Hq, Lq] head weights: softmax over each token's top_k router logits, 0 elsewhere."""
    order = torch.argsort(router.double(), dim=-1, descending=True, stable=True)[..., :top_k]
    kept = torch.zeros_like(router, dtype=torch.bool).scatter(-1, order, True)
    weights = torch.softmax(router.double().masked_fill(~kept, -math.inf), dim=-1)
    return weights.permute(0, 2, 1)


@pytest.mark.parametrize("Hkv", [4, 2])
def test_moh_example_matches_flex_times_head_weights(Hkv):
    module = examples.load_module("moh")
    _, mask, _, routing = parts(module.moh)
    q, k, v = random_qkv(module.SEQ_LEN, module.SEQ_LEN, Hkv)
    out = module.moh(q, k, v, backend="reference")
    expected = flex64(q, k, v, None, mask) * moh_weights(module.router_logits, routing.k).unsqueeze(-1)
    assert_close_to_reference(out, expected, None, module.SEQ_LEN)


def test_moh_with_a_small_router_matches_flex():
    Lq, top_k = 97, 3
    router = torch.randn(BATCH, Lq, HEADS, generator=torch.Generator().manual_seed(5))
    var = attncc.variant(mask=masks.causal, routing=attncc.TopKHeads(top_k, router))
    q, k, v = random_qkv(Lq, Lq, 2)
    expected = flex64(q, k, v, None, masks.causal) * moh_weights(router, top_k).unsqueeze(-1)
    assert_close_to_reference(var(q, k, v, backend="reference"), expected, None, Lq)


# ---- the combined graph: differential attention = flex - lambda * flex ------------------------


@pytest.mark.parametrize("L", [64, 97, 130])
def test_differential_attention_matches_two_flex_calls(L):
    program = examples.load_module("differential_attention").differential_attention
    gen = torch.Generator().manual_seed(L)
    inputs = {n: torch.randn(BATCH, HEADS, L, HEAD_DIM, generator=gen) for n in ("q1", "k1", "q2", "k2", "v")}
    lam = 0.6
    out = program(**inputs, lam=torch.tensor(lam), backend="reference")
    o1 = flex64(inputs["q1"], inputs["k1"], inputs["v"], None, masks.causal)
    o2 = flex64(inputs["q2"], inputs["k2"], inputs["v"], None, masks.causal)
    assert_close_to_reference(out, o1 - lam * o2, None, L)


# ---- the factories at other sizes than the module defaults ------------------------------------


def factory_cases() -> list:
    doc = examples.load_module("document_masking")
    nat = examples.load_module("neighborhood_2d")
    cross = examples.load_module("cross_attention_padding")
    rel = examples.load_module("relative_position_bias")
    moa = examples.load_module("moa")
    table = torch.randn(HEADS, 2 * 130 - 1, generator=torch.Generator().manual_seed(7))
    return [
        pytest.param(None, doc.generate_doc_mask_mod(doc.random_document_ids(97, 4, seed=3)), 97, 97, id="document-97"),
        pytest.param(None, nat.generate_neighborhood_mask(3, (9, 11)), 99, 99, id="neighborhood-9x11"),
        pytest.param(None, nat.generate_neighborhood_mask(3, (9, 11), dilation=2), 99, 99, id="neighborhood-9x11-d2"),
        pytest.param(None, cross.generate_padding_mask(torch.tensor([130, 57])), 70, 130, id="padding-70x130"),
        pytest.param(rel.generate_relative_bias(table, 130), None, 130, 130, id="relative-bias-130"),
        pytest.param(None, moa.generate_moa_mask(torch.tensor([3, 17, 64, 200], dtype=torch.int32)), 97, 97, id="moa-97"),
    ]


@pytest.mark.parametrize(("score_fn", "mask", "Lq", "Lkv"), factory_cases())
def test_example_factories_match_flex_at_small_sizes(score_fn, mask, Lq, Lkv):
    var = attncc.variant(score_fn, mask=mask, name="factory")
    q, k, v = random_qkv(Lq, Lkv, 2)
    assert_close_to_reference(var(q, k, v, backend="reference"), flex64(q, k, v, score_fn, mask), None, Lkv)


def test_library_masks_in_examples_equal_their_hand_written_forms():
    """strided.py writes Sparse Transformers' mask by hand; attncc.masks.strided must agree."""
    from torch.nn.attention.flex_attention import create_mask

    strided = examples.load_module("strided")
    hand, library = strided.strided_mask, masks.strided(strided.STRIDE)
    assert torch.equal(create_mask(hand, 1, 1, 97, 97, device="cpu"), create_mask(library, 1, 1, 97, 97, device="cpu"))


# ---- registry and main() ----------------------------------------------------------------------


def test_registry_lists_every_example_file_with_its_main_variant():
    files = {p.stem for p in examples.EXAMPLES_DIR.glob("*.py") if p.stem != "__init__"}
    assert set(examples.EXAMPLES) == files
    assert len(files) >= 24
    for name in examples.EXAMPLES:
        module = examples.load_module(name)
        assert module.__doc__ and len(module.__doc__) > 80, f"{name}: docstring must cite the paper"
        assert name in PROGRAMS, f"{name}.py must define a program named {name}"
        assert callable(module.main)
        assert examples.example_file(name).is_file()
    with pytest.raises(KeyError, match="unknown example"):
        examples.load_module("no_such_example")


@pytest.mark.parametrize("name", list(examples.EXAMPLES))
def test_example_main_runs(name, capsys):
    examples.load_module(name).main()
    assert "matches" in capsys.readouterr().out
