"""The Triton backend against the reference backend (SEMANTICS.md tolerances).

On a machine without a GPU the kernels run on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, set at the top of this module before triton is first imported, since
triton decorates its own helpers such as ``tl.zeros`` then; when another test module imported
triton first, this whole file runs again in a fresh subprocess instead).
Shapes stay tiny (L <= 48, D = 16): the interpreter is exact but slow.

GPU run (H100/H200): ``ATTNCC_TRITON_GPU_TESTS=1 python -m pytest tests/test_triton_backend.py -q``
uses CUDA tensors instead (interpreter off) and adds float16 cases at larger shapes.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

GPU = os.environ.get("ATTNCC_TRITON_GPU_TESTS") == "1"
_OLD_INTERPRET = os.environ.get("TRITON_INTERPRET")
if not GPU:
    # NOTE: must precede triton's first import: triton decorates tl.zeros & co. at import time.
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")
pytest.importorskip("jinja2")

import attncc  # noqa: E402
from attncc import masks  # noqa: E402
from attncc.codegen.reference.attention import run_plan  # noqa: E402
from attncc.testing import (  # noqa: E402
    assert_close_to_reference,
    check_against_reference,
    check_gradient_penalty,
    reference_outputs,
)

DEVICE = "cuda" if GPU else "cpu"
if GPU and not torch.cuda.is_available():
    pytest.skip("ATTNCC_TRITON_GPU_TESTS=1 needs a CUDA device", allow_module_level=True)
# Another test module may have imported triton before this one set TRITON_INTERPRET: then the
# interpreter cannot run here, and the whole module runs once more in a fresh subprocess.
INTERPRETED = GPU or type(triton.language.zeros).__name__ == "InterpretedFunction"
in_process = pytest.mark.skipif(not INTERPRETED, reason="triton imported without TRITON_INTERPRET; see subprocess test")


@pytest.fixture(autouse=True, scope="module")
def interpreter():
    """Keep TRITON_INTERPRET=1 while this module runs; restore the caller's value afterwards."""
    if not GPU:
        os.environ["TRITON_INTERPRET"] = "1"
    yield
    if _OLD_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _OLD_INTERPRET


@pytest.mark.skipif(INTERPRETED, reason="runs only when triton was imported without the interpreter")
def test_module_in_fresh_interpreter_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def _qkv(B=1, Hq=4, Hkv=2, Lq=20, Lkv=24, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g).to(DEVICE, dtype)
    return make(B, Hq, Lq, D), make(B, Hkv, Lkv, D), make(B, Hkv, Lkv, D)


SLOPES = torch.rand(4, generator=torch.Generator().manual_seed(1)).to(DEVICE)
BIAS = torch.randn(4, 64, generator=torch.Generator().manual_seed(2)).to(DEVICE)
SINK = torch.randn(4, generator=torch.Generator().manual_seed(3)).to(DEVICE)
ALLOWED = (torch.rand(48, 48, generator=torch.Generator().manual_seed(12)) > 0.3).to(DEVICE)
DECAY = (0.7 + 0.3 * torch.rand(4, generator=torch.Generator().manual_seed(10))).to(DEVICE)
TEMP = torch.tensor([1.5], device=DEVICE)
ROUTER = torch.randn(1, 20, 4, generator=torch.Generator().manual_seed(9)).to(DEVICE)
DOCS = torch.tensor([0] * 7 + [1] * 10 + [2] * 7, device=DEVICE)


def _alibi(score, b, h, q_idx, kv_idx):
    return score - SLOPES[h] * (q_idx - kv_idx).abs()


def _softcap(score, b, h, q_idx, kv_idx):
    return 5.0 * torch.tanh(score / 5.0)


def _bias_table(score, b, h, q_idx, kv_idx):
    return score + BIAS[h, q_idx - kv_idx + 32]


def _every_third_key_dropped(score, b, h, q_idx, kv_idx):
    return torch.where(kv_idx % 3 == 0, float("-inf"), score)


VARIANTS = {
    "dense": lambda: attncc.variant(),
    "causal": lambda: attncc.variant(mask=masks.causal),
    "alibi_causal": lambda: attncc.variant(_alibi, mask=masks.causal),
    "softcap": lambda: attncc.variant(_softcap),
    "bias_table": lambda: attncc.variant(_bias_table),
    "neg_inf_scores": lambda: attncc.variant(_every_third_key_dropped),
    "sliding_window": lambda: attncc.variant(mask=masks.sliding_window(5)),
    "document_causal": lambda: attncc.variant(mask=masks.document(DOCS) & masks.causal),
    "prefix_lm": lambda: attncc.variant(mask=masks.prefix_lm(6)),
    "strided": lambda: attncc.variant(mask=masks.strided(4)),
    "bool_table_mask": lambda: attncc.variant(mask=lambda b, h, q_idx, kv_idx: ALLOWED[q_idx, kv_idx]),
    "floor_semantics": lambda: attncc.variant(mask=lambda b, h, q_idx, kv_idx: ((q_idx - kv_idx) // 3) % 2 == 0),
    "sinks": lambda: attncc.variant(mask=masks.causal, normalizer=attncc.Softmax(sink=SINK)),
    "sigmoid": lambda: attncc.variant(mask=masks.causal, normalizer="sigmoid"),
    "softplus": lambda: attncc.variant(mask=masks.causal, normalizer="softplus"),
    "relu": lambda: attncc.variant(normalizer="relu"),
    "relu2_causal": lambda: attncc.variant(mask=masks.causal, normalizer="relu2"),
    "pointwise_unnormalized": lambda: attncc.variant(normalizer=attncc.Pointwise("softplus", normalize=False)),
    "stick_breaking": lambda: attncc.variant(mask=masks.causal, normalizer="stick_breaking"),
    "stick_breaking_strict": lambda: attncc.variant(mask=lambda b, h, q, k: q > k, normalizer="stick_breaking"),
    "softcap_slopes": lambda: attncc.variant(lambda s, b, h, q, k: 5.0 * torch.tanh(s / 5.0) - SLOPES[h] * (q - k).abs()),
    "sigmoid_bias_table": lambda: attncc.variant(_bias_table, normalizer="sigmoid"),
    "learned_phi": lambda: attncc.variant(normalizer=attncc.Pointwise(lambda s: torch.relu(s) * TEMP[0])),
    "linear_causal": lambda: attncc.variant(mask=masks.causal, normalizer=attncc.Linear()),
    "linear_strict_relu": lambda: attncc.variant(mask=lambda b, h, q, k: q > k, normalizer=attncc.Linear("relu")),
    "linear_decay": lambda: attncc.variant(mask=masks.causal, normalizer=attncc.Linear(
        "identity", normalize=False, decay=DECAY)),
    "linear_global": lambda: attncc.variant(normalizer=attncc.Linear()),
    "linear_traced": lambda: attncc.variant(mask=masks.causal, normalizer=attncc.Linear(lambda x: torch.relu(x) + 0.5)),
    "softcap_learned_phi": lambda: attncc.variant(_softcap, normalizer=attncc.Pointwise(lambda s: torch.relu(s) * TEMP[0])),
    "moba_token": lambda: attncc.variant(mask=masks.causal, routing=attncc.TopKBlocks(block=8, k=2)),
    "moba_query_block": lambda: attncc.variant(routing=attncc.TopKBlocks(block=8, k=2, per="query_block")),
    "moh_heads": lambda: attncc.variant(mask=masks.causal, routing=attncc.TopKHeads(k=2, router=ROUTER)),
}
SOFTMAX = {"dense", "causal", "alibi_causal", "softcap", "neg_inf_scores", "document_causal", "sinks"}


@in_process
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_forward_float32_matches_reference(name):
    """Every variant the checker accepts computes SEMANTICS.md's output (GQA 4:2, Lq != Lkv)."""
    var = VARIANTS[name]()
    q, k, v = _qkv()
    check_against_reference(var, q, k, v, backend="triton", return_lse=name in SOFTMAX)
    if name.startswith(("mo", "linear")):
        check_against_reference(var, q, k, v, backend="triton", q_offset=4)
    assert var.last_choice.backend.name == "triton"


EXAMPLES = sorted(p for p in (Path(__file__).resolve().parents[1] / "examples").glob("*.py")
                  if p.name != "__init__.py")


@in_process
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_on_triton(path):
    """Each example's own main() (its default sizes) with backend="triton": the checker accepts
    every example variant and the result matches the float64 reference."""
    from attncc.loader import import_file

    module = import_file(path)
    if GPU:
        pytest.skip("examples build CPU tensors")
    module.main(backend="triton")


@pytest.mark.skipif(GPU, reason="the GPU run compiles for real")
def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter accepts code the Triton compiler rejects: compile forward, backward,
    routing and linear kernels of three examples down to sm_90 cubins (no GPU needed)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "attncc.codegen.triton.compile_check", "stick_breaking", "moh",
                             "lightning_attention"], env=env, capture_output=True, text=True, timeout=600,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert result.stdout.count(" compiled") >= 8, result.stdout


@in_process
@pytest.mark.parametrize("name", ["causal", "alibi_causal", "sinks", "softplus", "stick_breaking", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_low_precision(name, dtype):
    """float16/bfloat16 inputs accumulate in float32: FlashAttention's error rule holds."""
    q, k, v = _qkv(dtype=dtype, seed=4)
    check_against_reference(VARIANTS[name](), q, k, v, backend="triton")


@in_process
def test_q_offset_and_mqa():
    """Decoding-style q_offset (runtime) and MQA (one kv head shared by every query head)."""
    var = VARIANTS["alibi_causal"]()
    q, k, v = _qkv(Hkv=1, Lq=5, Lkv=33)
    check_against_reference(var, q, k, v, backend="triton", q_offset=28, return_lse=True)


@in_process
@pytest.mark.parametrize("mask", [
    lambda b, h, q, kv: (q * 100_000_000 + kv) % 3 == 0,  # past 2**31 for q >= 22
    lambda b, h, q, kv: (q * 100_000_000 - kv * 300_000_000) // 7 % 5 < 3,
    lambda b, h, q, kv: ((b + 1) * 2**30 + q) % 3 != 1,  # b = 1: 2**31
], ids=["q_times_1e8", "difference", "batch_times_2_30"])
def test_integer_masks_past_int32_compute_as_torch_does(mask):
    """Positions are int32 tiles in the kernels; an integer node that may pass 2**31 computes in
    int64, as torch's does (``q * 10**8`` had wrapped into another mask)."""
    q, k, v = _qkv(B=2, Hq=2, Hkv=2, Lq=40, Lkv=40)
    check_against_reference(attncc.variant(mask=mask), q, k, v, backend="triton")


@in_process
@pytest.mark.parametrize("name", ["alibi_causal", "sinks", "stick_breaking", "moba_token", "bias_table"])
def test_gqa_packing_for_decoding(name):
    """Decoding-sized Lq with GQA 4:1 packs the group's query heads into one tile (shared K/V loads)."""
    from attncc.codegen.triton import launcher

    var = VARIANTS[name]()
    q, k, v = _qkv(Hq=4, Hkv=1, Lq=3, Lkv=40)
    assert launcher.pack_gqa(var.plan.regions[0], 4, 3, 16)
    check_against_reference(var, q, k, v, backend="triton", q_offset=20, return_lse=name in SOFTMAX)


@in_process
def test_fully_masked_rows_give_zero_and_minus_inf_lse():
    """A row with no key: o = 0 and lse = -inf (never NaN); with a sink, lse = sink."""
    q, k, v = _qkv()
    var = attncc.variant(mask=lambda b, h, q_idx, kv_idx: q_idx > 12)
    out, lse = var(q, k, v, backend="triton", return_lse=True)
    assert torch.equal(out[:, :, :13], torch.zeros_like(out[:, :, :13]))
    assert torch.isneginf(lse[:, :, :13]).all() and torch.isfinite(lse[:, :, 13:]).all()
    with_sink = attncc.variant(mask=lambda b, h, q_idx, kv_idx: q_idx > 12, normalizer=attncc.Softmax(sink=SINK))
    _, lse = with_sink(q, k, v, backend="triton", return_lse=True)
    assert torch.allclose(lse[:, :, 0], SINK.float().view(1, -1).expand(lse.shape[0], -1))
    # a head whose sink is switched off (-inf): o = 0 and lse = -inf there too, never NaN
    off = SINK.clone()
    off[0] = float("-inf")
    switched = attncc.variant(mask=lambda b, h, q_idx, kv_idx: q_idx > 12, normalizer=attncc.Softmax(sink=off))
    out, lse = switched(q, k, v, backend="triton", return_lse=True)
    assert torch.equal(out[:, 0, :13], torch.zeros_like(out[:, 0, :13])) and torch.isneginf(lse[:, 0, :13]).all()
    check_against_reference(switched, q, k, v, backend="triton", return_lse=True)
    off.requires_grad_()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o, lse = switched(*leaves, backend="triton", return_lse=True)
    (o.square().sum() + lse[lse.isfinite()].sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in (*leaves, off)) and off.grad[0] == 0


@in_process
def test_new_sequence_length_reuses_the_module():
    """Lengths are runtime arguments: a new Lq/Lkv generates no new kernel module."""
    from attncc.codegen.triton import launcher

    var = VARIANTS["causal"]()
    q, k, v = _qkv(Lq=17, Lkv=17)
    check_against_reference(var, q, k, v, backend="triton")
    before = launcher.compiled_count()
    q, k, v = _qkv(Lq=40, Lkv=45)
    check_against_reference(var, q, k, v, backend="triton")
    assert launcher.compiled_count() == before


@in_process
@pytest.mark.parametrize("name", ["causal", "sinks"])
def test_split_kv_decoding_matches_reference(name):
    """The split-KV path (partials merged by log-sum-exp, sink added once) for Lq <= 16."""
    var = VARIANTS[name]()
    q, k, v = _qkv(Lq=3, Lkv=48)
    out, lse = _split_run(var, q, k, v, q_offset=45, splits=3)
    ref64, _ = reference_outputs(var, {"q": q, "k": k, "v": v}, q_offset=45, return_lse=True)
    assert_close_to_reference(out, ref64[0], None, 48)
    assert_close_to_reference(lse.double(), ref64[1].double(), None, 48, what="lse")


def _split_run(var, q, k, v, *, q_offset, splits):
    from attncc.codegen.triton import BACKEND

    return BACKEND.run(var.plan, {"q": q, "k": k, "v": v}, var.tensors, scale=None, q_offset=q_offset,
                       return_lse=True, splits=splits)


def _grads(var, q, k, v, do, learn, backend):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    tensors = var.tensors
    if backend == "reference":
        tensors = {n: (t.detach().double().requires_grad_(n in learn) if t.is_floating_point() else t)
                   for n, t in tensors.items()}
        out = run_plan(var.plan, dict(zip("qkv", leaves, strict=True)), tensors, scale=None, q_offset=0,
                       return_lse=False)
    else:
        for n in learn:
            tensors[n].grad = None
            tensors[n].requires_grad_(True)
        out = var(*leaves, backend="triton")
    out.backward(do)
    grads = [t.grad for t in leaves] + [tensors[n].grad for n in learn]
    for n in learn:
        var.tensors[n].requires_grad_(False)
    return grads


def _reference_grads_lowp(var, q, k, v, do):
    """Reference gradients computed in the inputs' own (16-bit) dtype: e_ref of the FA rule."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = run_plan(var.plan, dict(zip("qkv", leaves, strict=True)), var.tensors, scale=None, q_offset=0,
                   return_lse=False, compute_dtype=q.dtype)
    out.backward(do)
    return [t.grad for t in leaves]


@in_process
@pytest.mark.parametrize("name", ["causal", "alibi_causal", "sinks", "sigmoid", "softplus", "stick_breaking"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gradients(name, dtype):
    """16-bit gradients of the fused backward within twice FlashAttention's forward rule."""
    var = VARIANTS[name]()
    shape = dict(Hq=4, Hkv=2, Lq=512, Lkv=512, D=64) if GPU else dict(Lq=40, Lkv=48)
    q, k, v = _qkv(dtype=dtype, seed=13, **shape)
    do = torch.randn((*q.shape[:3], v.shape[-1]), generator=torch.Generator().manual_seed(14)).to(DEVICE, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        got = _grads(var, q, k, v, do, (), "triton")
    ref = _grads(var, q.double(), k.double(), v.double(), do.double(), (), "reference")
    lowp = _reference_grads_lowp(var, q, k, v, do)
    for i, (g, r, lp) in enumerate(zip(got, ref, lowp, strict=True)):
        assert_close_to_reference(g, r, lp, k.shape[2], what=f"gradient {i}", factor=2)


@in_process
@pytest.mark.parametrize("name, learn", [
    ("causal", ()), ("alibi_causal", ()), ("softcap", ()), ("neg_inf_scores", ()), ("document_causal", ()),
    ("sinks", ("sink",)), ("sigmoid", ()), ("softplus", ()), ("relu", ()), ("relu2_causal", ()),
    ("pointwise_unnormalized", ()), ("moba_token", ()), ("moh_heads", "all"), ("stick_breaking", ()), ("stick_breaking_strict", ()), ("bias_table", "all"), ("softcap_slopes", "all"), ("sigmoid_bias_table", "all"),
])
def test_fused_backward_matches_reference(name, learn):
    """dq, dk, dv, sink logits and learned captured tensors (bias table, slopes) from the fused
    kernels, no fallback: softmax, sigmoid, pointwise, stick-breaking, routing (router logits too)."""
    var = VARIANTS[name]()
    learn = tuple(n for n in var.tensors if var.tensors[n].is_floating_point()) if learn == "all" else learn
    q, k, v = _qkv(seed=5)
    do = torch.randn((*q.shape[:3], v.shape[-1]), generator=torch.Generator().manual_seed(6)).to(DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a fallback would warn
        got = _grads(var, q, k, v, do, learn, "triton")
    ref = _grads(var, q.double(), k.double(), v.double(), do.double(), learn, "reference")
    for i, (g, r) in enumerate(zip(got, ref, strict=True)):
        assert_close_to_reference(g, r, None, k.shape[2], what=f"gradient {i}", factor=2)


@in_process
@pytest.mark.parametrize("name, learn", [("learned_phi", "all"), ("softcap_learned_phi", "all"),
                                         ("linear_decay", "all")])
def test_fallback_backward_warns_and_is_exact(name, learn):
    """Without a fused kernel the gradient comes from the reference backward, with a warning."""
    var = VARIANTS[name]()
    learn = tuple(var.tensors) if learn == "all" else learn
    q, k, v = _qkv(seed=7)
    do = torch.randn((*q.shape[:3], v.shape[-1]), generator=torch.Generator().manual_seed(8)).to(DEVICE)
    from attncc.codegen.triton import ops

    ops._WARNED.clear()
    with pytest.warns(UserWarning, match="reference backward"):
        got = _grads(var, q, k, v, do, learn, "triton")
    ref = _grads(var, q.double(), k.double(), v.double(), do.double(), learn, "reference")
    for i, (g, r) in enumerate(zip(got, ref, strict=True)):
        assert_close_to_reference(g, r, None, k.shape[2], what=f"gradient {i}", factor=2)


@in_process
@pytest.mark.parametrize("tiles", [(32, 16), (16, 32), (64, 64)])
def test_tuned_config_is_honoured(tiles):
    """A tuner's config (the tuning space's parameter names) changes tiles, never results."""
    from attncc.codegen.triton import BACKEND

    var = VARIANTS["document_causal"]()
    q, k, v = _qkv(Lq=24, Lkv=24)
    config = {"BLOCK_M": tiles[0], "BLOCK_N": tiles[1], "num_warps": 4, "num_stages": 1, "SPLIT_KV": 1}
    assert BACKEND.search_space is not None and "BLOCK_M" in BACKEND.search_space.params
    out = BACKEND.run(var.plan, {"q": q, "k": k, "v": v}, var.tensors, scale=None, q_offset=0, return_lse=False,
                      config=config)
    ref64, _ = reference_outputs(var, {"q": q, "k": k, "v": v})
    assert_close_to_reference(out, ref64, None, 24)


@in_process
def test_gradient_penalty_is_differentiated_as_the_reference():
    """``create_graph=True``: the gradients come from the reference's recomputed graph (with a
    warning), so a penalty on them differentiates (it had raised: no autograd formula for the
    backward op)."""
    check_gradient_penalty(VARIANTS["alibi_causal"](), *_qkv(Lq=20, Lkv=20), backend="triton")


@in_process
def test_differential_attention_values_and_gradients():
    """A graph of two attentions and a combine: each region's kernel, then o1 - lam * o2."""
    g = attncc.GraphBuilder("diff")
    q1, k1, q2, k2, v = g.inputs("q1", "k1", "q2", "k2", "v")
    lam = g.scalar("lam")
    program = g.build(g.attention(q1, k1, v, mask=masks.causal) - lam * g.attention(q2, k2, v, mask=masks.causal))
    gen = torch.Generator().manual_seed(11)
    inputs = {n: torch.randn(1, 2, 20, 16, generator=gen).to(DEVICE) for n in ("q1", "k1", "q2", "k2", "v")}
    leaves = {n: x.clone().requires_grad_() for n, x in inputs.items()}
    out = program(**leaves, lam=torch.tensor(0.8, device=DEVICE), backend="triton")
    assert program.last_choice.backend.name == "triton"
    out.sum().backward()
    ref_leaves = {n: x.double().requires_grad_() for n, x in inputs.items()}
    ref = program(**ref_leaves, lam=torch.tensor(0.8, dtype=torch.float64, device=DEVICE), backend="reference")
    ref.sum().backward()
    assert_close_to_reference(out, ref, None, 20)
    for n in inputs:
        assert_close_to_reference(leaves[n].grad, ref_leaves[n].grad, None, 20, what=f"d{n}", factor=2)


@in_process
def test_checker_declines_with_reasons():
    from attncc.codegen.triton import BACKEND

    q, _, _ = _qkv()
    windowed_linear = attncc.variant(mask=masks.sliding_window(4), normalizer=attncc.Linear())
    assert "quadratic" in BACKEND.checker(windowed_linear.plan, q)
    assert "dtype" in BACKEND.checker(VARIANTS["causal"]().plan, q.double())


@in_process
def test_unavailable_without_gpu_or_interpreter(monkeypatch):
    from attncc.codegen.triton import BACKEND

    assert BACKEND.unavailable() is None
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "TRITON_INTERPRET" in BACKEND.unavailable()


@in_process
def test_source_is_rendered_from_the_plan():
    """explain(source=True) shows the generated kernels, with the mask rendered inline."""
    from attncc.codegen.triton import BACKEND

    var = VARIANTS["document_causal"]()
    text = BACKEND.source(var.plan)
    assert "def attn_fwd(" in text and "def attn_bwd_dq(" in text and "tl.load(" in text
    assert "_floordiv" in BACKEND.source(VARIANTS["floor_semantics"]().plan)
    assert "def attn_linear(" in BACKEND.source(VARIANTS["linear_decay"]().plan)
    q, k, v = _qkv()
    var(q, k, v, backend="triton")
    assert "def attn_fwd(" in var.explain(source=True)


@in_process
def test_fake_implementation_gives_shapes():
    """The custom op's fake impl lets torch.compile trace without running a kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from attncc.codegen.triton import ops

    var = VARIANTS["causal"]()
    key = ops.register_region(var.plan.regions[0])
    with FakeTensorMode():
        q, k, v = torch.empty(2, 4, 7, 16), torch.empty(2, 2, 9, 16), torch.empty(2, 2, 9, 8)
        out, lse = ops.triton_attention(key, q, k, v, [], 0.25, 0, True, 1, [])
    assert out.shape == (2, 4, 7, 8) and lse.shape == (2, 4, 7) and lse.dtype == torch.float32


@in_process
def test_custom_op_passes_opcheck_and_composes_with_torch_compile():
    """Schema, fake tensor and AOT dispatch checks; a compiled caller gets the same values and grads."""
    from attncc.codegen.triton import ops

    var = VARIANTS["causal"]()
    q, k, v = _qkv(Hkv=4)
    key = ops.register_region(var.plan.regions[0])
    torch.library.opcheck(ops.triton_attention, (key, q, k, v, [], 0.25, 0, True, 1, [16, 16, 4, 1]),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    compiled = torch.compile(lambda a, b, c: var(a, b, c, backend="triton"), backend="aot_eager")
    leaf = q.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo's notes about graph breaks
        out = compiled(leaf, k, v)
    out.sum().backward()
    eager = q.clone().requires_grad_()
    var(eager, k, v, backend="triton").sum().backward()
    assert torch.allclose(out, var(q, k, v, backend="triton")) and torch.allclose(leaf.grad, eager.grad)


@pytest.mark.skipif(not GPU, reason="GPU-only: realistic shapes")
@in_process
@pytest.mark.parametrize("name", ["causal", "alibi_causal", "softcap", "sliding_window", "sinks", "sigmoid"])
def test_gpu_realistic_shapes(name):
    q, k, v = _qkv(B=2, Hq=4, Hkv=2, Lq=1000, Lkv=1000, D=128, dtype=torch.bfloat16)
    check_against_reference(VARIANTS[name](), q, k, v, backend="triton")
    assert math.isfinite(float(q.float().sum()))


@in_process
def test_captured_inference_tensors_work():
    """Document ids made under ``torch.inference_mode`` have no version counter: their tables are
    built on every call rather than keyed on one."""
    with torch.inference_mode():
        ids = torch.tensor([0] * 11 + [1] * 13, device=DEVICE)
    var = attncc.variant(mask=masks.document(ids) & masks.causal)
    q, k, v = _qkv(Lq=24, Lkv=24)
    for _ in range(2):
        check_against_reference(var, q, k, v, backend="triton")
