"""The TVM backend against the reference backend (SEMANTICS.md tolerances, attncc.testing).

Shapes are small and odd (not tile multiples) so that edge tiles, padding and GQA are
exercised; every variant compiles once (lengths, batch and heads are symbolic) and the
module is reused across the parametrizations.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("tvm")

import attncc
from attncc import masks
from attncc.codegen.tvm import (
    BACKEND,
    launcher,
    schedule,
)
from attncc.codegen.tvm import autograd as tvm_autograd
from attncc.testing import assert_close_to_reference, check_against_reference, random_qkv

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("tvm_cache_dir")


qkv = functools.partial(random_qkv, B=2, Hq=4, Hkv=2, Lq=37, Lkv=77, D=32, Dv=32)


HEADS = 4
SLOPES = torch.tensor([2.0 ** (-8.0 * (i + 1) / HEADS) for i in range(HEADS)])
DOCS = torch.tensor([0] * 30 + [1] * 25 + [2] * 40)  # covers q_offset + Lq and Lkv below
KEEP = torch.rand(96, generator=torch.Generator().manual_seed(3)) > 0.3  # a bool captured tensor
SINK = torch.tensor([0.5, -1.0, 0.0, 2.0])
TEMPERATURE = torch.tensor(0.7)  # a 0-d captured tensor (one-element kernel buffer)


def _alibi(score, b, h, q_idx, kv_idx):
    return score - SLOPES[h] * (q_idx - kv_idx)


def _softcap(score, b, h, q_idx, kv_idx):
    return 20.0 * torch.tanh(score / 20.0)


def _neg_inf_future(score, b, h, q_idx, kv_idx):
    return torch.where(kv_idx > q_idx, float("-inf"), score)


VARIANTS = {
    "dense": lambda: attncc.variant(),
    "causal": lambda: attncc.variant(mask=masks.causal),
    "sliding_window": lambda: attncc.variant(mask=masks.causal & masks.sliding_window(8)),
    "alibi": lambda: attncc.variant(_alibi, mask=masks.causal),
    "softcap": lambda: attncc.variant(_softcap),
    "document": lambda: attncc.variant(mask=lambda b, h, q, kv: DOCS[q] == DOCS[kv]),
    "bool_table": lambda: attncc.variant(mask=lambda b, h, q, kv: KEEP[kv] | (q == kv)),
    "neg_inf_score": lambda: attncc.variant(_neg_inf_future),
    "scalar_capture": lambda: attncc.variant(lambda s, b, h, q, kv: s * TEMPERATURE, mask=masks.causal),
    "sinks": lambda: attncc.variant(mask=masks.causal, normalizer=attncc.Softmax(sink=SINK)),
    "sigmoid": lambda: attncc.variant(mask=masks.causal, normalizer="sigmoid"),
    "sigmoid_bias": lambda: attncc.variant(normalizer=attncc.Sigmoid(bias=-2.0)),
    "softplus": lambda: attncc.variant(mask=masks.causal, normalizer="softplus"),
    "relu": lambda: attncc.variant(mask=masks.causal, normalizer="relu"),
    "relu2": lambda: attncc.variant(normalizer="relu2"),
    "pointwise_unnormalized": lambda: attncc.variant(
        normalizer=attncc.Pointwise(lambda s: torch.exp(-s * s), normalize=False)),
    "stick_breaking": lambda: attncc.variant(mask=masks.causal, normalizer="stick_breaking"),
    "stick_breaking_strict": lambda: attncc.variant(
        mask=lambda b, h, q, kv: q > kv, normalizer="stick_breaking"),
    "stick_breaking_dense": lambda: attncc.variant(normalizer="stick_breaking"),
}
_BUILT: dict[str, attncc.Variant] = {}


def variant(name: str) -> attncc.Variant:
    if name not in _BUILT:
        _BUILT[name] = VARIANTS[name]()
    return _BUILT[name]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_float32_matches_reference(name: str) -> None:
    """Every supported mask, score and normalizer, odd lengths, GQA 2, Lq != Lkv."""
    program = variant(name)
    assert BACKEND.checker(program.plan, torch.empty(1, 1, 1, 1)) is None
    q, k, v = qkv(Lq=37, Lkv=77)
    check_against_reference(program, q, k, v, backend="tvm")


@pytest.mark.parametrize("name", ["causal", "alibi", "sinks", "document", "stick_breaking", "softplus"])
def test_q_offset_and_decode_rows(name: str) -> None:
    """q_offset moves q_idx everywhere: decoding a few rows at the end of a cache."""
    q, k, v = qkv(Lq=3, Lkv=90)
    check_against_reference(variant(name), q, k, v, backend="tvm", q_offset=87)
    q, k, v = qkv(Lq=20, Lkv=50, seed=1)
    check_against_reference(variant(name), q, k, v, backend="tvm", q_offset=11)


@pytest.mark.parametrize("Hkv", [1, 2, 4])
def test_gqa_and_mqa(Hkv: int) -> None:
    """Query head h reads kv head h // (Hq // Hkv); one module serves every head count."""
    q, k, v = qkv(Hq=4, Hkv=Hkv, Lq=45, Lkv=45)
    check_against_reference(variant("alibi"), q, k, v, backend="tvm", return_lse=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["causal", "alibi", "sinks", "sigmoid", "stick_breaking"])
def test_low_precision_inputs(name: str, dtype: torch.dtype, without_pair_dots) -> None:
    """float16/bfloat16 in, float32 accumulation, output in the input dtype (bfloat16 pair dots:
    ``test_bfloat16_pair_dots_match_reference``)."""
    q, k, v = qkv(Lq=33, Lkv=70, dtype=dtype)
    out = variant(name)(q, k, v, backend="tvm")
    assert out.dtype == dtype
    check_against_reference(variant(name), q, k, v, backend="tvm")


@pytest.mark.parametrize("name", ["causal", "sliding_window", "alibi", "softcap", "document", "bool_table", "sinks",
                                  "sigmoid", "softplus", "stick_breaking", "dense"])
def test_bfloat16_pair_dots_match_reference(name: str, monkeypatch) -> None:
    """On a host with AVX-512 BF16, bfloat16 calls multiply by pairs (``bf16_pairs``): K read in
    place, V laid out by key pairs, weights rounded to bfloat16. Odd and even key lengths (a zero
    pads the last pair), ragged tiles, GQA, a query offset, lse, and several query tiles."""
    from attncc.codegen.tvm import bf16_pairs

    if not bf16_pairs.on_host():
        pytest.skip("this host has no AVX-512 BF16: bfloat16 takes the float32 paths (tested above)")
    paired: list[tuple[int, ...]] = []
    key_pairs = launcher.key_pairs
    monkeypatch.setattr(launcher, "key_pairs", lambda v, slot: paired.append(tuple(v.shape)) or key_pairs(v, slot))
    lse = name in ("causal", "sliding_window", "alibi", "softcap", "document", "bool_table", "sinks", "dense")
    for Lq, Lkv in ((33, 70), (37, 77), (80, 90), (12, 61)):  # 12 rows: a GQA group packed into a tile
        q, k, v = qkv(Lq=Lq, Lkv=Lkv, dtype=torch.bfloat16)
        check_against_reference(variant(name), q, k, v, backend="tvm", return_lse=lse)
    q, k, v = qkv(Lq=20, Lkv=95, dtype=torch.bfloat16)
    check_against_reference(variant(name), q, k, v, backend="tvm", q_offset=75, return_lse=lse)
    assert len(paired) == 5


def test_key_pairs_and_words_layouts() -> None:
    """``launcher.key_pairs``: word (p, c) holds values 2p and 2p + 1 of column c, a zero after an
    odd last key; ``launcher.words``: feature pairs, a misaligned view copied first."""
    v = torch.randn(2, 3, 7, 16).to(torch.bfloat16)
    for L in (7, 6):
        pairs = launcher.key_pairs(v[:, :, :L], 0).view(torch.bfloat16).view(2, 3, (L + 1) // 2, 16, 2)
        assert torch.equal(pairs[..., 0], v[:, :, 0:L:2])
        assert torch.equal(pairs[:, :, : L // 2, :, 1], v[:, :, 1:L:2])
        if L % 2:
            assert not pairs[:, :, -1, :, 1].any()
    flat = torch.randn(65).to(torch.bfloat16)
    for t in (flat[:64].view(2, 32), flat[1:].view(2, 32)):
        assert t.storage_offset() % 2 == 0 or launcher.words(t).data_ptr() != t.data_ptr()
        assert torch.equal(launcher.words(t).view(torch.bfloat16), t)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["causal", "alibi", "stick_breaking"])
def test_low_precision_kv_converted_up_front(name: str, dtype: torch.dtype, monkeypatch, without_pair_dots) -> None:
    """Enough query tiles (``forward.UP_FRONT_QUERY_TILES``) and float16 / bfloat16 K and V reach
    the kernel as float32 copies: the same results, GQA and a ragged last tile included."""
    from attncc.codegen.tvm import forward

    staged: list[torch.dtype] = []
    stage_kv = launcher.stage_kv
    monkeypatch.setattr(launcher, "stage_kv", lambda k, v, dt, **kw: staged.append(dt) or stage_kv(k, v, dt, **kw))
    Lq = forward.UP_FRONT_QUERY_TILES * 64 + 13
    q, k, v = qkv(B=1, Hq=4, Hkv=2, Lq=Lq, Lkv=Lq + 5, D=16, Dv=16, dtype=dtype)
    check_against_reference(variant(name), q, k, v, backend="tvm", q_offset=5, return_lse=name != "stick_breaking")
    assert staged == [torch.float32]
    q, k, v = qkv(Lq=33, Lkv=70, dtype=dtype)  # one query tile: converted a tile at a time in the kernel
    check_against_reference(variant(name), q, k, v, backend="tvm")
    assert staged == [torch.float32, dtype]


@pytest.mark.parametrize("name", ["causal", "sinks", "document"])
def test_return_lse(name: str) -> None:
    q, k, v = qkv(Lq=29, Lkv=61)
    check_against_reference(variant(name), q, k, v, backend="tvm", return_lse=True)


def test_fully_masked_rows_give_zero_and_minus_inf_lse() -> None:
    """Rows with no kept key: o = 0 and lse = -inf (softmax), o = 0 (normalized pointwise)."""
    every_third = attncc.variant(mask=lambda b, h, q, kv: (q % 3 != 0) & (kv <= q))
    q, k, v = qkv(Lq=40, Lkv=40)
    out, lse = every_third(q, k, v, backend="tvm", return_lse=True)
    assert torch.equal(out[:, :, ::3], torch.zeros_like(out[:, :, ::3]))
    assert torch.isinf(lse[:, :, ::3]).all() and (lse[:, :, ::3] < 0).all()
    check_against_reference(every_third, q, k, v, backend="tvm", return_lse=True)
    relu_rows = attncc.variant(mask=lambda b, h, q, kv: (q % 3 != 0) & (kv <= q), normalizer="relu")
    check_against_reference(relu_rows, q, k, v, backend="tvm")


def test_a_sink_switched_off_on_a_dead_row_gives_zero_not_nan() -> None:
    """A head's sink of -inf (no sink) on a row with no key: o = 0, lse = -inf, gradients 0
    (``exp(-inf - -inf)`` made all three NaN, in the reference too)."""
    from attncc.testing import check_gradients

    q, k, v = qkv(Lq=70, Lkv=70)
    sink = torch.tensor([float("-inf"), 0.5, float("-inf"), -1.0], requires_grad=True)
    program = attncc.variant(mask=lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (q_idx >= 10),
                             normalizer=attncc.Softmax(sink=sink))
    for backend in ("reference", "tvm"):
        out, lse = program(q, k, v, backend=backend, return_lse=True)
        assert torch.equal(out[:, 0, :10], torch.zeros_like(out[:, 0, :10])) and torch.isneginf(lse[:, 0, :10]).all()
        assert torch.allclose(lse[:, 1, :10], torch.tensor(0.5)) and torch.isneginf(lse[:, 2, :10]).all()
    check_against_reference(program, q, k, v, backend="tvm", return_lse=True)
    (name,) = [n for n in program.tensors if program.tensors[n] is sink]
    check_gradients(program, q, k, v, learn=(name,))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = program(*leaves, backend="tvm", return_lse=True)
    (out.square().sum() + lse[lse.isfinite()].sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in (*leaves, sink)) and sink.grad[0] == 0 and sink.grad[2] == 0


def test_tile_multiple_lengths_and_larger_head_dim() -> None:
    """Lengths that are whole tiles (no padding copies) and D = Dv = 64."""
    q, k, v = qkv(B=1, Hq=2, Hkv=2, Lq=128, Lkv=128, D=64, Dv=64)
    check_against_reference(variant("causal"), q, k, v, backend="tvm", return_lse=True)


@pytest.mark.parametrize(("lanes", "D"), [(0, 32), (4, 40), (8, 40), (16, 32), (16, 40)])
def test_q_tile_transpositions_match_reference(lanes: int, D: int, kernel_shapes) -> None:
    """Q tiles are transposed by strided reads (``transpose_lanes`` 0: hosts without AVX-512) or
    by shuffle networks of blocks of ``lanes`` (8 on AVX-512 hosts); 16 does not divide D = 40,
    which falls back to strided reads. Long and short query lengths (packed GQA rows), bfloat16."""
    from attncc.codegen.tvm import forward

    kernel_shapes(launcher, "transpose_lanes", lambda: lanes)
    source = forward.kernel_arguments(variant("causal").plan.regions[0], {"block_m": 64, "block_n": 64,
                                      "rows": 4, "vector": 16}, *qkv(D=D)[::2], scale=1.0, total_lkv=77)[0]
    assert source.transpose_lanes == lanes
    for name in ("causal", "sliding_window", "alibi"):
        check_against_reference(variant(name), *qkv(D=D), backend="tvm", return_lse=True)
    check_against_reference(variant("causal"), *qkv(B=1, Hq=4, Hkv=1, Lq=3, Lkv=70, D=D), backend="tvm")
    check_against_reference(variant("causal"), *qkv(D=D, dtype=torch.bfloat16), backend="tvm")


def test_ragged_last_tile_is_listed_partial() -> None:
    """FULL tiles evaluate no bound: a FULL last tile past ``Lkv`` moves to the PARTIAL list,
    at the end (lists stay ascending); whole-tile lengths keep their tables."""
    from attncc.passes.sparsify import block_tables_for

    region = variant("dense").plan.regions[0]
    tables = block_tables_for(region, 1, 2, 37, 150, (16, 64), 0, {})
    moved = schedule.ragged_tile_partial(tables, 150, 64)
    assert moved.full_count.flatten().tolist() == [2] * 3
    assert moved.partial_count.flatten().tolist() == [1] * 3
    assert moved.partial_index[..., 0].flatten().tolist() == [2] * 3
    assert schedule.ragged_tile_partial(tables, 150, 64) is moved  # computed once per tables
    whole = block_tables_for(region, 1, 2, 37, 128, (16, 64), 0, {})
    assert schedule.ragged_tile_partial(whole, 128, 64) is whole
    causal = block_tables_for(variant("causal").plan.regions[0], 1, 2, 150, 150, (64, 64), 0, {})
    assert schedule.ragged_tile_partial(causal, 150, 64) is causal  # its last tile is PARTIAL already


@given(counts=st.lists(st.integers(0, 40), min_size=1, max_size=60), heads=st.integers(1, 4),
       threads=st.integers(1, 8))
@settings(max_examples=60, deadline=None)
def test_task_order_lists_every_task_once_and_balances_the_runs(counts: list[int], heads: int,
                                                               threads: int) -> None:
    """Each (head, q tile) appears once; the heaviest of TVM's contiguous runs is no heavier
    than in row-major order."""
    from attncc.passes.sparsify import tables_from_classes

    nq = len(counts)
    classes = torch.zeros(1, heads, nq, 41, dtype=torch.int8)
    for qt, c in enumerate(counts):
        classes[0, :, qt, :c] = 2  # c FULL tiles
    tables = tables_from_classes(classes)
    order = schedule.task_order(tables, 1, heads, threads)
    assert sorted(order[order >= 0].tolist()) == list(range(heads * nq))
    work = (tables.partial_count + tables.full_count).float().reshape(-1) + schedule.TASK_OVERHEAD_TILES
    step = -(-order.numel() // threads)
    runs = [float(work[o[o >= 0].long()].sum()) for o in order.split(step)]
    assert max(runs) <= schedule._heaviest_run(work, -(-heads * nq // threads)) + 1e-3


def test_one_head_causal_balances_and_matches_reference() -> None:
    """One causal head: row-major runs would give the last thread most of the triangle."""
    from attncc.passes.sparsify import block_tables_for

    tables = block_tables_for(variant("causal").plan.regions[0], 1, 1, 512, 512, (64, 64), 0, {})
    order = schedule.task_order(tables, 1, 1, 2)
    assert order.tolist() != list(range(8))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        check_against_reference(variant("causal"), *qkv(B=1, Hq=1, Hkv=1, Lq=300, Lkv=300), backend="tvm")
    finally:
        torch.set_num_threads(threads)


def test_new_length_reuses_the_module() -> None:
    """Sequence lengths are symbolic: a new length in the same tile bucket is not a new compile."""
    program = variant("sliding_window")
    program(*qkv(Lq=21, Lkv=21), backend="tvm")
    compiled = launcher.STATS["compiled"]
    for L in (40, 64, 131):  # NOTE: Lq <= 16 selects decode-sized tiles, a different module
        check_against_reference(program, *qkv(Lq=L, Lkv=L, seed=L), backend="tvm")
    assert launcher.STATS["compiled"] == compiled


def test_automatic_choice_is_tvm_on_cpu() -> None:
    program = variant("alibi")
    program(*qkv())
    assert program.last_choice.backend.name == "tvm"
    assert "tvm" in program.explain()


def test_checker_declines_with_reasons() -> None:
    """Unsupported plans fall back to the reference automatically, and explain() says why."""
    q, k, v = qkv(Lq=16, Lkv=16)
    linear = attncc.variant(mask=masks.causal & masks.sliding_window(8), normalizer=attncc.Linear())  # quadratic form
    for program, words in ((linear, "linear"),):
        why = BACKEND.checker(program.plan, q)
        assert why is not None and words in why
        program(q, k, v)
        assert program.last_choice.backend.name == "reference"
        assert words in program.explain()
        with pytest.raises(NotImplementedError, match=words):
            program(q, k, v, backend="tvm")
    assert "dtype" in BACKEND.checker(variant("causal").plan, q.double())


def test_backward_runs_reference_with_one_warning() -> None:
    """Gradients of q, k, v match the reference's, with a warning, where a learned tensor is read
    by the mask (the one case left without a generated backward; test_tvm_backward has the rest)."""
    widths = torch.tensor([6.0, 9.0, 12.0, 15.0], requires_grad=True)
    program = attncc.variant(mask=lambda b, h, qi, ki: (qi >= ki) & (qi - ki < widths[h]))
    q, k, v = (t.requires_grad_(True) for t in qkv(Lq=24, Lkv=24))
    # NOTE: the warning is once per plan and process; another module's test may have warned already
    tvm_autograd._WARNED.discard(program.plan.fingerprint)
    with pytest.warns(UserWarning, match="reference backend"):
        out = program(q, k, v, backend="tvm")
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    inputs64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = attncc.codegen.reference.attention.run_plan(
        program.plan, dict(zip("qkv", inputs64)), {n: widths.detach().double() for n in program.tensors},
        scale=None, q_offset=0, return_lse=False)
    expected = torch.autograd.grad(ref.square().sum(), inputs64)
    for got, want in zip(grads, expected):
        assert_close_to_reference(got, want, None, 24, what="gradient", factor=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        program(q, k, v, backend="tvm")  # warned once per plan


SECOND_PROCESS = (
    "import warnings, torch, attncc\n"
    "from attncc.codegen.tvm import launcher\n"
    "from attncc.testing import check_against_reference\n"
    "warnings.simplefilter('always')\n"
    "g = torch.Generator().manual_seed(0)\n"
    "q, k, v = (torch.randn(1, 2, 19, 32, generator=g) for _ in range(3))\n"
    "check_against_reference(attncc.variant(mask=attncc.masks.causal), q, k, v, backend='tvm')\n"
    "print(launcher.STATS['compiled'], launcher.STATS['loaded'])\n"
)


def _second_process(cache: Path) -> tuple[int, int, str]:
    env = {**os.environ, "ATTNCC_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", SECOND_PROCESS], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    compiled, loaded = map(int, done.stdout.split()[-2:])
    return compiled, loaded, done.stderr


def test_disk_cache_reused_by_another_process(tvm_cache_dir: Path) -> None:
    """A second process loads the compiled module from the disk cache instead of compiling."""
    variant("causal")(*qkv(), backend="tvm")
    assert list((tvm_cache_dir / "tvm").glob("*.so"))
    compiled, loaded, _ = _second_process(tvm_cache_dir)
    assert (compiled, loaded) == (0, 1)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_damaged_cache_file_warns_and_recompiles(tvm_cache_dir: Path, damage: str) -> None:
    """A damaged cache file (a kernel's or the OpenMP launcher's) costs a warning and a rebuild,
    never a crash or a wrong result: a truncated library used to kill every later process with
    SIGBUS at its first call (``sealed``)."""
    variant("causal")(*qkv(), backend="tvm")
    paths = list((tvm_cache_dir / "tvm").glob("*.so"))
    assert any(p.name.startswith("openmp_launch") for p in paths) and len(paths) >= 2
    for path in paths:
        data = path.read_bytes()
        # NOTE: a new inode; overwriting a library some process has loaded would SIGBUS it
        broken = path.with_suffix(".broken")
        broken.write_bytes(b"not a shared library" if damage == "garbage" else data[: len(data) // 2])
        os.replace(broken, path)
    compiled, loaded, stderr = _second_process(tvm_cache_dir)
    assert (compiled, loaded) == (1, 0)
    assert "damaged" in stderr and "TVM's thread pool" not in stderr
    assert _second_process(tvm_cache_dir)[:2] == (0, 1)  # the rebuilt file is good


def test_cache_files_are_readable_by_others_as_the_umask_allows(tvm_cache_dir: Path) -> None:
    """Users sharing a cache directory load each other's modules (``mkstemp`` makes files private)."""
    variant("causal")(*qkv(), backend="tvm")
    umask = os.umask(0)
    os.umask(umask)
    for path in (tvm_cache_dir / "tvm").glob("*.so"):
        assert path.stat().st_mode & 0o777 == 0o644 & ~umask


def test_cache_dir_expands_the_home_directory(monkeypatch) -> None:
    """``ATTNCC_CACHE_DIR=~/x`` means the same directory for the modules as for the tuning cache."""
    from attncc.autotune.cache import cache_dir as tuning_dir

    monkeypatch.setenv("ATTNCC_CACHE_DIR", "~/attncc-cache")
    assert launcher.cache_dir() == Path.home() / "attncc-cache" / "tvm"
    assert launcher.cache_dir().parent == Path(tuning_dir()).expanduser()


def _example_programs():
    sys.path.insert(0, str(REPO))
    try:
        from examples import EXAMPLES
    except ImportError:
        return []
    return sorted(EXAMPLES)


@pytest.mark.parametrize("name", _example_programs())
def test_examples_through_tvm(name: str) -> None:
    """Every example whose plan the checker accepts runs through TVM and matches the reference."""
    import importlib

    module = importlib.import_module(f"examples.{name}")
    program = getattr(module, name)
    why = BACKEND.checker(program.plan, torch.empty(1, 1, 1, 1))
    if why is not None:
        pytest.skip(f"TVM declines {name}: {why}")
    module.main(backend="tvm")



def test_captured_tensor_of_a_new_size_reuses_the_module() -> None:
    """Captured buffers have symbolic sizes: document ids for a longer sequence compile nothing."""
    built = []
    for L in (70, 150):
        docs = torch.arange(L) // 30
        built.append(attncc.variant(mask=lambda b, h, q, kv, docs=docs: docs[q] == docs[kv]))
        q, k, v = qkv(B=1, Hq=2, Hkv=2, Lq=L, Lkv=L, D=16, Dv=16)
        before = dict(launcher.STATS)
        check_against_reference(built[-1], q, k, v, backend="tvm")
        if L == 150:
            assert launcher.STATS["compiled"] == before["compiled"]
            assert launcher.STATS["memory_hits"] > before["memory_hits"]


def test_softmax_exp_polynomials_are_float32_accurate() -> None:
    """The coefficient tables: ``fast_exp_nonpositive``'s, 2**f within 1e-7 relative on [-1/2, 1/2];
    ``vector_exp``'s, within 1e-7 on [0, 1] and exactly 1 at 0."""
    from attncc.codegen.tvm.render import _EXP2_MINIMAX5
    from attncc.codegen.tvm.vector_exp import EXP2_UNIT

    for table, low in ((_EXP2_MINIMAX5, -0.5), (EXP2_UNIT, 0.0)):
        points = [low + i / 4000 for i in range(4001)]
        worst = max(abs(sum(c * f**k for k, c in enumerate(table)) / 2**f - 1) for f in points)
        assert worst < 1e-7
    assert EXP2_UNIT[0] == 1.0


def test_vector_exp_matches_exp2_and_its_ends() -> None:
    """``vector_exp.exp2`` compiled: within 2e-7 relative of 2**x over the normal range (x from
    -126 to 0, and above 0), denormals within an absolute 2e-45, exactly 0 at -inf and below
    -150 (masked scores weigh nothing), exactly 1 at 0, inf at +inf and past 128, NaN kept."""
    import tvm

    from attncc.codegen.tvm import llvm_import, vector_exp

    if not vector_exp.on_host():
        pytest.skip("this host has no AVX-512F and DQ: kernels use the portable exponential")
    x, y = llvm_import.lanes("X", first="i0 * 16"), llvm_import.lanes("Y", first="i0 * 16")
    source = f"""
@T.prim_func
def f(x_h: T.handle, y_h: T.handle):
    T.func_attr({{"global_symbol": "f", "tirx.noalias": True}})
    N = T.int32()
    X = T.match_buffer(x_h, (N,), "float32")
    Y = T.match_buffer(y_h, (N,), "float32")
    {vector_exp.import_statement()}
        for i0 in range(N // 16):
            {y} = {vector_exp.exp2(x)}
"""
    built = tvm.compile(tvm.script.from_source(source), target=tvm.target.Target(launcher.host_target()))
    inf = float("inf")
    ends = torch.tensor([-inf, -1e30, -200.0, -150.0, -149.5, -149.0, -130.25, -126.0, -0.0, 0.0, 1e-7, -1e-7,
                         127.5, 128.0, 500.0, inf])
    x = torch.cat([ends, torch.linspace(-126.0, 0.0, 4000), torch.linspace(0.0, 127.0, 1000),
                   torch.tensor([float("nan")] * 16)])
    x = torch.cat([x, torch.zeros(-len(x) % 16)])
    y = torch.empty_like(x)
    built["f"](x, y)
    exact = torch.exp2(x.double())
    normal = (exact >= 2.0**-126) & (exact < 2.0**128)
    assert ((y.double() - exact).abs() / exact)[normal].max() < 2e-7
    denormal = exact < 2.0**-126
    assert (y.double() - exact)[denormal].abs().max() < 2e-45
    assert y[(x <= -151) | (x == -inf)].eq(0).all()
    assert y[(x > 128) & ~x.isnan()].eq(inf).all()
    assert y[x == 0].eq(1).all()
    assert y[x.isnan()].isnan().all()


def test_portable_exponentials_match_reference(kernel_shapes) -> None:
    """Kernels without ``vector_exp`` (hosts without AVX-512, or vectors of 8 rows) keep the
    portable polynomials: softmax in base 2 (no score function) and base e (ALiBi), a sink,
    stick-breaking; GQA, lse."""
    from attncc.codegen.tvm import forward, vector_exp

    region = variant("causal").plan.regions[0]
    config = {"block_m": 64, "block_n": 64, "rows": 4, "vector": 16}
    assert forward.kernel_arguments(region, config, *qkv()[::2], scale=1.0, total_lkv=77)[0].vector_exp == \
        vector_exp.on_host()
    kernel_shapes(forward, "uses_vector_exp", lambda shape: False)
    assert not forward.kernel_arguments(region, config, *qkv()[::2], scale=1.0, total_lkv=77)[0].vector_exp
    for name in ("causal", "alibi", "sinks", "document"):
        check_against_reference(variant(name), *qkv(), backend="tvm", return_lse=True)
    check_against_reference(variant("stick_breaking"), *qkv(), backend="tvm")


def test_vector_exp_needs_vectors_of_sixteen_rows() -> None:
    """The renderer refuses ``vector_exp`` in a shape whose vectors hold 8 rows."""
    from attncc.codegen.tvm.kernels import KernelShape, render_forward

    region = variant("causal").plan.regions[0]
    with pytest.raises(ValueError, match="vector exponentials need"):
        render_forward(region, KernelShape(32, 32, "float32", 64, 64, 4, 8, vector_exp=True))


@pytest.mark.parametrize(("norm", "layout"), [
    ("softmax", "key_major"), ("sigmoid", "key_major"), ("softplus", "key_major"), ("stick_breaking", "key_major"),
    ("sigmoid", "row_major"), ("softplus", "row_major"),
])
def test_score_loops_compile_to_vector_code(norm: str, layout: str) -> None:
    """No scalar float division in a kernel's compiled code (LLVM IR; a row-major softmax divides
    once per row in its finish, so it is not listed). Written inside a weight's selects, the fast
    log1p made TVM scalarize the softplus loop: 3.6x slower, and no result changed."""
    import re

    import tvm

    from attncc.codegen.tvm.kernels import KernelShape, render_forward

    region = attncc.variant(mask=masks.causal, normalizer=norm).plan.regions[0]
    shape = (KernelShape(64, 64, "float32", 64, 64, 4, 16) if layout == "key_major" else
             KernelShape(64, 64, "float32", 4, 64, 1, 8, kv_chunks=True, layout="row_major"))
    built = tvm.compile(tvm.script.from_source(render_forward(region, shape)),
                        target=tvm.target.Target(launcher.host_target()))
    module = getattr(built, "mod", built)
    ir = (module.imports[0] if len(module.imports) else module).inspect_source("ll")
    assert re.search(r"fdiv (?:[a-z]+ )*<\d+ x float>", ir), "no vector division at all: the check reads the wrong code"
    assert not re.search(r"fdiv (?:[a-z]+ )*float ", ir)


def test_fast_log1p_and_softplus_are_float32_accurate() -> None:
    """``render.fast_log1p`` compiled: log1p within 2e-7 relative for y from 1e-9 to 1e6, and the
    kernels' softplus (``render.softplus_steps``) within 1e-6 for s in [-40, 20]. Forming ``1 + y`` for
    small y lost ``6e-8 / y`` relative (6e-4 at s = -9.2, beyond a softplus kernel's tolerance)."""
    import tvm

    from attncc.codegen.tvm.render import fast_log1p, softplus_steps

    fills, softplus_value = softplus_steps("S[i0 * 8 + i1]", "E[i1]")
    source = f"""
@T.prim_func
def f(y_h: T.handle, s_h: T.handle, log_h: T.handle, softplus_h: T.handle):
    T.func_attr({{"global_symbol": "f", "tirx.noalias": True}})
    N = T.int32()
    Y = T.match_buffer(y_h, (N,), "float32")
    S = T.match_buffer(s_h, (N,), "float32")
    LOG = T.match_buffer(log_h, (N,), "float32")
    SP = T.match_buffer(softplus_h, (N,), "float32")
    E = T.decl_buffer((8,), "float32")
    for i0 in range(N // 8):
        for i1 in T.vectorized(8):
            LOG[i0 * 8 + i1] = {fast_log1p('Y[i0 * 8 + i1]')}
        for i1 in T.vectorized(8):
            {fills[0]}
        for i1 in T.vectorized(8):
            {fills[1]}
        for i1 in T.vectorized(8):
            SP[i0 * 8 + i1] = {softplus_value}
"""
    module = tvm.compile(tvm.script.from_source(source), target=tvm.target.Target(launcher.host_target()))
    y = torch.logspace(-9, 6, 4000)
    s = torch.linspace(-40.0, 20.0, 4000)
    log, softplus = torch.empty_like(y), torch.empty_like(s)
    module["f"](y, s, log, softplus)
    assert float((log.double() / torch.log1p(y.double()) - 1).abs().max()) < 2e-7
    assert float((softplus.double() / torch.nn.functional.softplus(s.double()) - 1).abs().max()) < 1e-6


def test_float64_sink_is_declined_by_the_checker() -> None:
    """A float64 sink (e.g. from numpy) has no kernel buffer dtype: the checker must say so, so the
    automatic choice runs the reference and backend="tvm" names the sink, instead of a KeyError
    from rendering."""
    sink = torch.tensor([0.5, -1.0, 0.25, 2.0], dtype=torch.float64)
    program = attncc.variant(mask=masks.causal, normalizer=attncc.Softmax(sink=sink))
    q, k, v = qkv(Lq=16, Lkv=16)
    why = BACKEND.checker(program.plan, q)
    assert why is not None and "sink" in why and "float64" in why
    out = program(q, k, v)
    assert program.last_choice.backend.name == "reference"
    torch.testing.assert_close(out, program(q, k, v, backend="reference"))
    with pytest.raises(NotImplementedError, match="sink tensor 'sink' has dtype float64"):
        program(q, k, v, backend="tvm")
