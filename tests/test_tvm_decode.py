"""TVM backend: split-KV decoding (keys folded into the batch, GQA heads into rows) vs the reference.

Decode shapes (Lq in 1, 4, 16 over a cache of 2048+ keys, small D and H) must take the split
path (checked by watching the kernel's folded key length) and match the reference within
SEMANTICS.md's tolerances, sinks added once, masks reading kv_idx, q_offset = Lkv - Lq.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

pytest.importorskip("tvm")

import attncc
from attncc import masks
from attncc.codegen.tvm import decode, launcher
from attncc.testing import check_against_reference, random_qkv

SINK = torch.tensor([0.5, -1.0, 0.0, 2.0])
SLOPES = torch.tensor([2.0 ** (-4.0 * (i + 1)) for i in range(4)])
DOCS = torch.arange(4096) // 700  # documents of 700 tokens


pytestmark = pytest.mark.usefixtures("tvm_cache_dir")


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch):
    """Chunks of 256 keys and two threads: the split path's decisions on this file's small shapes
    are the ones a long cache gets (``decode.cpu_splits``)."""
    monkeypatch.setattr(decode, "CPU_MIN_CHUNK", 256)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def kernel_keys(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The keys a task of every kernel call walks (a split call's tasks walk one chunk of the cache,
    which the kernel reads in place: ``kv_chunk``); negative for the plain kernel."""
    seen: list[int] = []
    real = launcher.Launch.__call__

    def spy(self, q, k, v, tensors):
        if self.shape.kv_chunks:  # (chunks per sequence, keys per chunk)
            assert self.chunks[0] == q.shape[0] // k.shape[0]
        seen.append(self.chunks[1] if self.shape.kv_chunks else -k.shape[2])
        return real(self, q, k, v, tensors)

    monkeypatch.setattr(launcher.Launch, "__call__", spy)
    return seen


qkv = functools.partial(random_qkv, B=1, Hq=4, Hkv=1, Lq=1, Lkv=2048, D=16)


def _alibi(score, b, h, q_idx, kv_idx):
    return score - SLOPES[h] * (q_idx - kv_idx)


VARIANTS = {
    "causal": lambda: attncc.variant(mask=masks.causal),
    "window": lambda: attncc.variant(mask=masks.sliding_window(300)),
    "sinks": lambda: attncc.variant(mask=masks.causal, normalizer=attncc.Softmax(sink=SINK)),
    "alibi_documents": lambda: attncc.variant(_alibi, mask=lambda b, h, q, kv: (DOCS[q] == DOCS[kv]) & (q >= kv)),
    "sigmoid": lambda: attncc.variant(mask=masks.causal, normalizer="sigmoid"),
    "relu_sum": lambda: attncc.variant(mask=masks.causal, normalizer=attncc.Pointwise("relu", normalize=False)),
    "softcap_softplus_sum": lambda: attncc.variant(
        lambda s, b, h, q, kv: 10.0 * torch.tanh(s / 10.0), mask=masks.sliding_window(700),
        normalizer=attncc.Pointwise("softplus", normalize=False)),
}
SOFTMAX = ("causal", "window", "sinks", "alibi_documents")
_BUILT: dict[str, attncc.Variant] = {}


def variant(name: str) -> attncc.Variant:
    if name not in _BUILT:
        _BUILT[name] = VARIANTS[name]()
    return _BUILT[name]


@pytest.mark.parametrize("Lq", [1, 4, 16])
@pytest.mark.parametrize("name", ["causal", "sinks", "window"])
def test_split_kv_softmax(name: str, Lq: int, kernel_keys: list[int]) -> None:
    """Softmax with and without sinks, a window reading kv_idx; the lse merges too."""
    q, k, v = qkv(Lq=Lq, Lkv=2048)
    check_against_reference(variant(name), q, k, v, backend="tvm", q_offset=2048 - Lq, return_lse=True)
    assert kernel_keys and 0 < max(kernel_keys) < 2048


@pytest.mark.parametrize("name", ["alibi_documents", "sigmoid", "relu_sum"])
def test_split_kv_scores_and_normalizers(name: str, kernel_keys: list[int]) -> None:
    """A score and mask reading h, q_idx and kv_idx through captured tensors; the sigmoid's bias
    uses the whole cache length; an unnormalised pointwise map sums its partials."""
    q, k, v = qkv(Lq=4, Lkv=3000, seed=1)
    check_against_reference(variant(name), q, k, v, backend="tvm", q_offset=2996)
    assert kernel_keys and 0 < max(kernel_keys) < 3000


@pytest.mark.parametrize("Hkv", [1, 2, 4])
def test_split_kv_gqa_batches_and_ragged_chunks(Hkv: int, kernel_keys: list[int]) -> None:
    """GQA 4:1, 2:1 and MHA, two batches, a cache length that no chunk size divides; three threads,
    which 2, 4 and 8 tasks do not fill evenly (so each is split in 3)."""
    torch.set_num_threads(3)
    q, k, v = qkv(B=2, Hkv=Hkv, Lq=4, Lkv=2333, seed=2)
    check_against_reference(variant("sinks"), q, k, v, backend="tvm", q_offset=2329, return_lse=True)
    assert kernel_keys and 0 < max(kernel_keys) < 2333 / 2


@pytest.fixture
def staged_pointers(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The data pointers of the K and V every kernel call reads (after ``launcher.stage_kv``)."""
    seen: list[tuple[int, int]] = []
    real = launcher.stage_kv

    def spy(k_, v_, dtype, **kwargs):
        staged = real(k_, v_, dtype, **kwargs)
        seen.append((staged[0].data_ptr(), staged[1].data_ptr()))
        return staged

    monkeypatch.setattr(launcher, "stage_kv", spy)
    return seen


def test_split_kv_reads_the_cache_in_place(staged_pointers: list[tuple[int, int]]) -> None:
    """A float32 cache reaches the kernel as the caller's tensors (no chunked copy of it)."""
    q, k, v = qkv(B=2, Hkv=2, Lq=1, Lkv=2333, seed=4)
    check_against_reference(variant("causal"), q, k, v, backend="tvm", q_offset=2332)
    assert staged_pointers == [(k.data_ptr(), v.data_ptr())]


def test_split_kv_reads_a_slice_of_a_preallocated_cache_in_place(staged_pointers: list[tuple[int, int]]) -> None:
    """Decoding from ``cache[:, :, :L]`` (strided: the cache is longer) reads it as it is."""
    q, k, v = qkv(B=2, Hkv=2, Lq=1, Lkv=3000, seed=5)
    for length in (2333, 2334):
        ks, vs = k[:, :, :length], v[:, :, :length]
        assert not ks.is_contiguous()
        check_against_reference(variant("sinks"), q, ks, vs, backend="tvm", q_offset=length - 1, return_lse=True)
    assert staged_pointers == [(k.data_ptr(), v.data_ptr())] * 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("Lq", [1, 4])
def test_split_kv_reads_a_low_precision_cache_in_place(dtype: torch.dtype, Lq: int,
                                                       staged_pointers: list[tuple[int, int]]) -> None:
    """A float16 / bfloat16 cache (a slice of a longer one) reaches the kernel as it is, converted
    in registers: converting it to float32 every step made bfloat16 steps 1.7x slower than float32
    ones (32 query heads over 8 kv heads of 128, 4096 keys)."""
    q, k, v = qkv(B=2, Hkv=2, Lq=Lq, Lkv=3000, dtype=dtype, seed=6)
    ks, vs = k[:, :, :2333], v[:, :, :2333]
    check_against_reference(variant("sinks"), q, ks, vs, backend="tvm", q_offset=2333 - Lq, return_lse=True)
    check_against_reference(variant("sigmoid"), q, ks, vs, backend="tvm", q_offset=2333 - Lq)
    assert staged_pointers == [(k.data_ptr(), v.data_ptr())] * 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_split_kv_low_precision(dtype: torch.dtype) -> None:
    q, k, v = qkv(Lq=4, Lkv=2048, dtype=dtype, seed=3)
    out = variant("sinks")(q, k, v, backend="tvm", q_offset=2044)
    assert out.dtype == dtype
    check_against_reference(variant("sinks"), q, k, v, backend="tvm", q_offset=2044)


def test_short_cache_and_long_queries_stay_tiled(kernel_keys: list[int]) -> None:
    """Lkv below ``CPU_MIN_KEYS`` or Lq above the plan's max_lq runs the plain tiled kernel."""
    program = variant("causal")
    q, k, v = qkv(Lq=4, Lkv=255)
    program(q, k, v, backend="tvm", q_offset=251)
    q, k, v = qkv(Lq=17, Lkv=2048)
    program(q, k, v, backend="tvm", q_offset=2031)
    q, k, v = qkv(Lq=4, Lkv=256)
    program(q, k, v, backend="tvm", q_offset=252)
    assert kernel_keys == [-255, -2048, 256]


def test_normalized_pointwise_is_not_split() -> None:
    """A normalised pointwise map needs row sums the kernel does not return: no split."""
    program = attncc.variant(mask=masks.causal, normalizer="relu")
    region = program.plan.regions[0]
    q, k, _ = qkv(Lq=1, Lkv=4096)
    assert decode.num_splits(program.plan, region, q, k) == 0
    assert decode.num_splits(variant("relu_sum").plan, variant("relu_sum").plan.regions[0], q, k) > 1


def test_merge_adds_the_sink_once() -> None:
    """Fully masked partials with a sink give o = 0 and lse = sink; without a sink lse = -inf."""
    o = torch.randn(1, 3, 2, 1, 4)
    lse = torch.full((1, 3, 2, 1), -math.inf)
    sink = torch.tensor([0.5, -1.0]).view(1, 2, 1)
    out, merged = decode.merge_partials(o, lse, sink)
    assert torch.equal(out, torch.zeros(1, 2, 1, 4))
    assert torch.equal(merged, sink.expand(1, 2, 1))
    out, merged = decode.merge_partials(o, lse, None)
    assert torch.equal(out, torch.zeros(1, 2, 1, 4)) and torch.all(merged == -math.inf)
    lse = torch.tensor([0.0, math.log(3.0), -math.inf]).view(1, 3, 1, 1).expand(1, 3, 2, 1)
    out, merged = decode.merge_partials(o, lse, sink)
    total = 1.0 + 3.0 + torch.exp(sink)
    want = (o[:, 0] + 3.0 * o[:, 1]) / total.unsqueeze(-1)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(merged, torch.log(total))


def test_split_kv_with_grad_uses_the_plain_path(kernel_keys: list[int]) -> None:
    """No split under autograd: the plain kernel's backward gives the reference's gradients."""
    program = variant("sinks")
    q, k, v = (t.requires_grad_() for t in qkv(Lq=4, Lkv=2048, seed=4))
    program(q, k, v, backend="tvm", q_offset=2044).square().sum().backward()
    assert kernel_keys == [-2048]
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    program(q2, k2, v2, backend="reference", q_offset=2044).square().sum().backward()
    for got, want in zip((q.grad, k.grad, v.grad), (q2.grad, k2.grad, v2.grad), strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("tasks", "most", "threads", "want"), [
    (8, 8, 2, 1),  # the tasks fill the threads: no split
    (1, 8, 2, 2),
    (3, 8, 2, 2),  # 3 tasks on 2 threads: 6 fill them
    (5, 8, 16, 3),  # 15 of 16 threads
    (1, 1, 2, 1),  # a cache too short to split
    (1, 0, 2, 1),
])
def test_cpu_splits_fill_the_threads_evenly(tasks: int, most: int, threads: int, want: int) -> None:
    assert decode.cpu_splits(tasks, most, threads) == want


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_one_row_per_kv_head(name: str, kernel_keys: list[int]) -> None:
    """Without GQA a step has one query row per kv head: the row-major kernel's 8-key blocks
    (its widest), every variant, a cache that is not a whole number of tiles; lse too for softmax."""
    q, k, v = qkv(Hkv=4, Lq=1, Lkv=1300, D=32, seed=8)
    check_against_reference(variant(name), q, k, v, backend="tvm", q_offset=1299, return_lse=name in SOFTMAX)
    assert kernel_keys == [1344]


@pytest.mark.parametrize("name", ["causal", "sinks", "sigmoid"])
def test_one_chunk_decoding_step(name: str, kernel_keys: list[int]) -> None:
    """Two kv heads on two threads: one chunk, the whole cache in place; the sink still enters."""
    q, k, v = qkv(Hkv=2, Lq=1, Lkv=2100, seed=6)
    check_against_reference(variant(name), q, k, v, backend="tvm", q_offset=2099)
    assert kernel_keys == [2112]  # the cache rounded up to whole tiles of 64


@pytest.mark.parametrize("name", ["causal", "window", "sinks"])
def test_decoding_steps_share_tables_within_a_bucket(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Step by step over a preallocated cache across a bucket's and a tile's edge (q_offset 2047,
    2048): every step matches the reference, and the tables are built once per bucket, tile count
    and chunking, not per step."""
    folds: list[int] = []
    real = decode._fold_tables
    monkeypatch.setattr(decode, "_fold_tables", lambda *a: folds.append(1) or real(*a))
    q, k, v = qkv(Lq=1, Lkv=2112, seed=7)
    steps = range(2036, 2112, 5)
    for length in steps:
        ks, vs = k[:, :, :length], v[:, :, :length]
        check_against_reference(variant(name), q, ks, vs, backend="tvm", q_offset=length - 1)
    assert 1 < len(folds) <= 4 < len(steps)


@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(VARIANTS)), Hkv=st.sampled_from([4, 2, 1]), Lq=st.integers(1, 7),
       Lkv=st.integers(1024, 1400), D=st.sampled_from([8, 16, 40]), Dv=st.sampled_from([8, 24, 40]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_row_major_kernel_matches_reference(name: str, Hkv: int, Lq: int, Lkv: int, D: int, Dv: int,
                                            dtype: torch.dtype) -> None:
    """Fewer than 8 query rows per kv head (GQA group times Lq) take the row-major kernel
    (``decode_kernel.py``): every variant, ragged caches, features not a multiple of its vectors
    of values, bfloat16; lse too for softmax."""
    assume((4 // Hkv) * Lq < 8)
    layouts: list[str] = []
    real = launcher.Launch.__call__

    def spy(self, *args):
        layouts.append(self.shape.layout)
        return real(self, *args)

    q, k, v = qkv(Hkv=Hkv, Lq=Lq, Lkv=Lkv, D=D, Dv=Dv, dtype=dtype, seed=Lkv)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(launcher.Launch, "__call__", spy)
        check_against_reference(variant(name), q, k, v, backend="tvm", q_offset=Lkv - Lq,
                                return_lse=name in SOFTMAX)
    assert layouts == ["row_major"]


@pytest.mark.parametrize("name", ["causal", "no_mask"])
def test_decoding_steps_in_one_bucket_reuse_one_launch(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps whose positions share a bucket share their tables, so ``launcher.launch`` prepares the
    kernel call once for them; the key length, which moves every step, is read off K each call.
    Without a mask too: its tiles follow from the geometry (it prepared every step)."""
    prepared: list[int] = []
    real = launcher.prepare

    def spy(*args, **kwargs):
        prepared.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(launcher, "prepare", spy)
    program = variant("causal") if name == "causal" else attncc.variant()
    q, k, v = qkv(Lkv=640)
    for L in (600, 601, 602, 605):
        check_against_reference(program, q, k[:, :, :L], v[:, :, :L], backend="tvm", q_offset=L - 1)
    assert len(prepared) == 1


@pytest.mark.parametrize("Lq", [1, 3], ids=["row-major", "key-major"])
@pytest.mark.parametrize("mask", ["causal", "none_visible"])
def test_one_chunk_adds_each_rows_own_sink(Lq: int, mask: str, kernel_keys: list[int]) -> None:
    """One chunk's kernel adds the sink itself, read by each folded row's real query head: every
    head's sink differs (one switched off with -inf, one dominant), and rows that see no key get
    o = 0 and lse = their sink."""
    sink = torch.tensor([0.5, -math.inf, 6.0, -2.0, 1.0, 0.0, -0.5, 3.0])
    keep = masks.causal if mask == "causal" else (lambda b, h, q, kv: kv > q + 5)
    program = attncc.variant(mask=keep, normalizer=attncc.Softmax(sink=sink))
    q, k, v = qkv(Hq=8, Hkv=2, Lq=Lq, Lkv=700, seed=9)
    check_against_reference(program, q, k, v, backend="tvm", q_offset=700 - Lq, return_lse=True)
    assert kernel_keys == [704]  # one chunk: the cache rounded up to whole tiles of 64
