"""Per-call memoization on the TVM path: a repeated call reuses what cannot have changed and still
honours everything that can (a new tuning-cache entry, environment variables, the thread count,
captured tensors' contents, gradients, lse). Nothing here measures time."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("tvm")

import attncc
from attncc import masks
from attncc.autotune import lookup
from attncc.autotune.cache import TuningCache
from attncc.autotune.keys import ShapeKey, TuningKey
from attncc.autotune.records import Entry
from attncc.codegen.tvm import BACKEND, forward, launcher
from attncc.codegen.tvm.kernels import KernelShape
from attncc.codegen.tvm.space import SPACE
from attncc.passes.sparsify import block_tables_for
from attncc.testing import check_against_reference, random_qkv
from attncc.validate import check_qkv

pytestmark = pytest.mark.usefixtures("tvm_cache_dir")


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list[KernelShape]:
    """The ``KernelShape`` of every forward launch (the config a call really ran with), prepared
    for this call or kept from an earlier one (``forward.run_forward``)."""
    seen: list[KernelShape] = []
    real = launcher.Launch.__call__

    def spy(self, *args, **kwargs):
        seen.append(self.shape)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(launcher.Launch, "__call__", spy)
    return seen


@pytest.fixture
def tuning_dir(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A fresh, empty default tuning cache (compiled kernels stay in memory)."""
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("ATTNCC_TUNING", raising=False)
    monkeypatch.delenv("ATTNCC_CACHE_PATH", raising=False)


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def ran_with(shape: KernelShape) -> dict:
    return {knob: getattr(shape, knob) for knob in SPACE.params}


def record_other_config(var: attncc.Variant, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict:
    """Record (as ``attncc tune`` does, through a cache object of its own) a config for this call's
    key that differs from the default, and return it."""
    shape = ShapeKey.from_tensors(q, k, v)
    default = SPACE.default_for(shape)
    tuned = next(c for c in SPACE.configs(shape) if c != default)
    key = TuningKey(var.plan.fingerprint, "tvm", lookup.device_for("tvm", None), shape)
    assert TuningCache().record(Entry(key, tuned, 0.001, trials=1))
    return tuned


def test_a_tuned_entry_written_between_calls_is_used_by_the_next_call(tuning_dir, launches):
    var = attncc.variant(mask=masks.causal)
    q, k, v = random_qkv(B=1, Hq=2, Hkv=2, Lq=64, Lkv=64)
    var(q, k, v)
    default = ran_with(launches[-1])
    assert default == SPACE.default_for(ShapeKey.from_tensors(q, k, v))
    tuned = record_other_config(var, q, k, v)
    check_against_reference(var, q, k, v, backend=None)
    assert ran_with(launches[-1]) == tuned
    assert "tuned: exact key" in forward.select_config(var.plan, q, k, v)[1]


def test_environment_variables_are_read_on_every_call(tuning_dir, launches, monkeypatch, tmp_path):
    var = attncc.variant(mask=masks.causal)
    q, k, v = random_qkv(B=1, Hq=2, Hkv=2, Lq=64, Lkv=64)
    tuned = record_other_config(var, q, k, v)
    default = SPACE.default_for(ShapeKey.from_tensors(q, k, v))
    var(q, k, v)
    assert ran_with(launches[-1]) == tuned
    monkeypatch.setenv("ATTNCC_TUNING", "off")
    var(q, k, v)
    assert ran_with(launches[-1]) == default, "ATTNCC_TUNING=off set between two calls"
    monkeypatch.delenv("ATTNCC_TUNING")
    var(q, k, v)
    assert ran_with(launches[-1]) == tuned
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path / "elsewhere"))
    var(q, k, v)
    assert ran_with(launches[-1]) == default, "ATTNCC_CACHE_DIR moved to an empty cache between two calls"


@pytest.mark.filterwarnings("ignore:.*was tuned only on other devices")
def test_the_thread_count_is_part_of_the_device(tuning_dir, launches, threads):
    """A config tuned at one thread count is not used at another (the device fingerprint holds it)."""
    var = attncc.variant(mask=masks.causal)
    q, k, v = random_qkv(B=1, Hq=2, Hkv=2, Lq=64, Lkv=64)
    torch.set_num_threads(1)
    one = lookup.device_for("tvm", None)
    tuned = record_other_config(var, q, k, v)
    var(q, k, v)
    assert ran_with(launches[-1]) == tuned
    torch.set_num_threads(2)
    assert lookup.device_for("tvm", None) != one
    check_against_reference(var, q, k, v, backend=None)
    assert ran_with(launches[-1]) == SPACE.default_for(ShapeKey.from_tensors(q, k, v))
    torch.set_num_threads(1)
    var(q, k, v)
    assert ran_with(launches[-1]) == tuned


def test_changed_document_ids_change_the_block_tables_and_the_result():
    """Tables of a mask over a captured tensor are reused only while its contents are unchanged."""
    ids = torch.tensor([0] * 40 + [1] * 60 + [2] * 28)
    var = attncc.variant(mask=masks.document(ids))
    q, k, v = random_qkv(B=1, Hq=2, Hkv=2, Lq=128, Lkv=128)
    region = var.plan.regions[0]

    def tables():
        return block_tables_for(region, 1, 2, 128, 128, (32, 32), 0, var.tensors)

    before = var(q, k, v)
    first = tables()
    assert tables() is first, "unchanged contents: the same tables"
    ids[:] = torch.arange(128) // 32  # in place: the variant captured ids by reference
    changed = tables()
    assert changed is not first
    assert not torch.equal(changed.full_count, first.full_count)
    after = var(q, k, v)
    assert not torch.allclose(before, after)
    check_against_reference(var, q, k, v, backend=None)


def test_changed_document_ids_are_honoured_on_the_packed_decode_path(launches):
    """GQA decoding packs a group's heads into a tile; its tables follow the captured ids too."""
    ids = torch.tensor([0] * 20 + [1] * 20 + [2] * 24)
    var = attncc.variant(mask=masks.document(ids))
    q, k, v = random_qkv(B=1, Hq=4, Hkv=2, Lq=4, Lkv=64)
    check_against_reference(var, q, k, v, backend=None, q_offset=60)
    assert launches[-1].group == 2
    ids[:] = 0
    check_against_reference(var, q, k, v, backend=None, q_offset=60)
    static = attncc.variant(mask=masks.causal)
    for _ in range(2):
        check_against_reference(static, q, k, v, backend=None, q_offset=60)
    assert launches[-1].group == 2


def test_a_smaller_tile_is_chosen_per_geometry_and_reused(launches):
    """A banded mask that is not half-planes (chunks) halves the default tile when that visits less
    work; the decision is memoized per tables, so repeated calls agree and stay correct."""
    var = attncc.variant(mask=masks.chunked(48))
    q, k, v = random_qkv(B=1, Hq=2, Hkv=2, Lq=512, Lkv=512)
    for _ in range(2):
        check_against_reference(var, q, k, v, backend=None)
    assert launches[-1] == launches[-2]


def test_gradients_and_lse_are_honoured_on_repeated_calls():
    var = attncc.variant(mask=masks.causal)
    q, k, v = random_qkv(B=1, Hq=2, Hkv=2, Lq=64, Lkv=64)
    assert var(q, k, v).grad_fn is None
    qg = q.clone().requires_grad_(True)
    out = var(qg, k, v)
    assert out.grad_fn is not None
    out.sum().backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all()
    with torch.no_grad():
        assert var(qg, k, v).grad_fn is None
    assert var(q, k, v).grad_fn is None
    check_against_reference(var, q, k, v, backend=None, return_lse=True)
    assert isinstance(var(q, k, v), torch.Tensor)


def test_the_checker_answer_is_per_plan_and_device_and_dtype_are_read_every_call():
    var = attncc.variant(mask=masks.causal)
    q = torch.zeros(1, 2, 16, 32)
    assert BACKEND.checker(var.plan, q) is None
    assert "dtype" in BACKEND.checker(var.plan, q.double())
    assert BACKEND.checker(var.plan, q) is None
    unknown = dataclasses.replace(var.plan.regions[0], normalizer="not a normalizer")
    declined = dataclasses.replace(var.plan, regions=(unknown,))
    assert "has no TVM kernel" in BACKEND.checker(declined, q)
    assert BACKEND.checker(dataclasses.replace(var.plan), q) is None
    assert BACKEND.checker(var.plan, q) is None


def test_a_memoized_argument_check_still_refuses_what_it_refused():
    q = torch.zeros(1, 2, 8, 16)
    check_qkv(q, q, q)
    bad_k = torch.zeros(1, 2, 8, 8)
    for _ in range(2):
        with pytest.raises(ValueError, match="head dim"):
            check_qkv(q, bad_k, q)
    with pytest.raises(TypeError, match=r"k must be a torch\.Tensor"):
        check_qkv(q, [0], q)
    check_qkv(q, q, q)


def test_memoized_static_tables_still_refuse_bad_sizes():
    var = attncc.variant(mask=masks.causal)
    region = var.plan.regions[0]
    tables = block_tables_for(region, 1, 2, 64, 64, (32, 32))
    assert block_tables_for(region, 1, 2, 64, 64, [32, 32]) is tables
    with pytest.raises(ValueError, match="B must be an int"):
        block_tables_for(region, True, 2, 64, 64, (32, 32))
    with pytest.raises(ValueError, match="Lq must be an int"):
        block_tables_for(region, 1, 2, 64.0, 64, (32, 32))
    assert tables.partial_index.is_contiguous() and tables.full_index.is_contiguous()


def test_kernel_functions_are_forgotten_with_the_modules():
    """``launcher.kernel_function`` memoizes a module's ``attn`` by source: clearing the modules
    must clear it too, so the next call loads the module (from disk) rather than reusing it."""
    var = attncc.variant(mask=masks.sliding_window(24))
    q, k, v = random_qkv(B=1, Hq=2, Hkv=2, Lq=48, Lkv=48)
    first = var(q, k, v, backend="tvm")
    hits = launcher.STATS["memory_hits"]
    var(q, k, v, backend="tvm")
    assert launcher.STATS["memory_hits"] > hits
    loaded = launcher.STATS["loaded"]
    launcher.clear_memory_cache()
    again = var(q, k, v, backend="tvm")
    assert launcher.STATS["loaded"] > loaded
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_a_region_hashes_by_value_and_its_copies_do_not_inherit_the_hash():
    """Regions key every per-call memo; their hash is computed once and kept on the object."""
    region = attncc.variant(mask=masks.causal).plan.regions[0]
    same = attncc.variant(mask=masks.causal).plan.regions[0]
    assert region is not same and region == same and hash(region) == hash(same)
    changed = dataclasses.replace(region, fused=not region.fused)
    assert changed != region and hash(changed) != hash(region)
    assert hash(dataclasses.replace(changed, fused=region.fused)) == hash(region)
    memo = {region: "causal"}
    assert memo[same] == "causal" and changed not in memo


@pytest.fixture
def prepared(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """The call signature (``forward.call_key``) of every forward launch prepared anew."""
    seen: list[tuple] = []
    real = forward._prepare_forward

    def spy(plan, region, q, k, v, tensors, scale, q_offset, config):
        seen.append(forward.call_key(plan, region, q, k, v, tensors, scale, q_offset, config))
        return real(plan, region, q, k, v, tensors, scale, q_offset, config)

    monkeypatch.setattr(forward, "_prepare_forward", spy)
    return seen


def test_a_repeated_call_runs_the_launch_its_first_call_prepared(prepared):
    """The same call signature decides nothing again; a new offset, scale or length is a new one."""
    var = attncc.variant(mask=masks.sliding_window(40))
    q, k, v = random_qkv(B=1, Hq=2, Hkv=2, Lq=96, Lkv=96)
    first = var(q, k, v)
    assert len(prepared) == 1
    torch.testing.assert_close(var(q.clone(), k.clone(), v.clone()), first, rtol=0, atol=0)
    assert len(prepared) == 1
    check_against_reference(var, q, k, v, backend=None, q_offset=8)
    check_against_reference(var, q, k, v, backend=None, scale=0.3)
    q2, k2, v2 = random_qkv(B=1, Hq=2, Hkv=2, Lq=80, Lkv=80, seed=1)
    check_against_reference(var, q2, k2, v2, backend=None)
    assert len(prepared) == 4 and len(set(prepared)) == 4
    check_against_reference(var, q, k, v, backend=None, q_offset=8)
    assert len(prepared) == 4


def test_a_score_tensor_written_in_place_is_read_by_the_next_call(prepared):
    """A captured tensor of the score (ALiBi slopes) may decide tiles (a score of -inf masks), so
    an in-place write is a new signature; unchanged, the prepared launch is reused."""
    slopes = torch.tensor([0.5, 0.25])
    var = attncc.variant(lambda s, b, h, q, kv: s - slopes[h] * (q - kv), mask=masks.causal)
    q, k, v = random_qkv(B=1, Hq=2, Hkv=2, Lq=64, Lkv=64)
    before = var(q, k, v)
    slopes.mul_(4.0)
    check_against_reference(var, q, k, v, backend=None)
    assert not torch.allclose(var(q, k, v), before)
    assert len(prepared) == 2


def test_captured_inference_tensors_are_not_keyed(prepared):
    """An inference tensor has no version to key on: every call prepares its launch, and is right."""
    with torch.inference_mode():
        ids = torch.tensor([0] * 30 + [1] * 34)
    var = attncc.variant(mask=masks.document(ids))
    q, k, v = random_qkv(B=1, Hq=2, Hkv=2, Lq=64, Lkv=64)
    for _ in range(2):
        check_against_reference(var, q, k, v, backend=None)
    assert prepared == [None, None]


def up_front_qkv(dtype: torch.dtype, seed: int = 0, Lkv: int | None = None) -> tuple[torch.Tensor, ...]:
    """Inputs with enough query tiles that float16 / bfloat16 K and V are converted up front."""
    Lq = forward.UP_FRONT_QUERY_TILES * 64 + 13
    return random_qkv(B=1, Hq=2, Hkv=1, Lq=Lq, Lkv=Lkv or Lq + 5, D=16, dtype=dtype, seed=seed)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_converted_keys_and_values_reuse_the_threads_workspace(dtype, without_pair_dots):
    """The float32 copies of K and V go into buffers the thread keeps (no fresh pages per call): the
    next call overwrites them, and neither call's output depends on them afterwards."""
    launcher.clear_memory_cache()
    seen: list[int] = []
    real = launcher.converted

    def spy(t, dt, slot):
        out = real(t, dt, slot)
        seen.append(out.untyped_storage().data_ptr())
        return out

    var = attncc.variant(mask=masks.causal)
    q, k, v = up_front_qkv(dtype)
    q2, k2, v2 = up_front_qkv(dtype, seed=1, Lkv=q.shape[2] - 40)  # fewer keys: a view of the same buffers
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(launcher, "converted", spy)
        first = var(q, k, v)
        second = var(q2, k2.transpose(2, 3).contiguous().transpose(2, 3), v2)  # K strided: copied as well
    assert len(seen) == 4 and seen[:2] == seen[2:] and seen[0] != seen[1]
    check_against_reference(var, q, k, v, backend="tvm")
    torch.testing.assert_close(var(q, k, v), first, rtol=0, atol=0)
    check_against_reference(var, q2, k2, v2, backend="tvm")
    torch.testing.assert_close(var(q2, k2, v2), second, rtol=0, atol=0)


def test_key_pairs_reuse_the_threads_workspace():
    """With bfloat16 pair dots, V's key-pair layout goes into the thread's workspace the same way:
    one buffer across calls, outputs independent of it afterwards."""
    from attncc.codegen.tvm import bf16_pairs

    if not bf16_pairs.on_host():
        pytest.skip("this host has no AVX-512 BF16: no key pairs")
    launcher.clear_memory_cache()
    seen: list[int] = []
    real = launcher.key_pairs

    def spy(v, slot):
        out = real(v, slot)
        seen.append(out.untyped_storage().data_ptr())
        return out

    var = attncc.variant(mask=masks.causal)
    q, k, v = up_front_qkv(torch.bfloat16)
    q2, k2, v2 = up_front_qkv(torch.bfloat16, seed=1, Lkv=q.shape[2] - 41)  # fewer keys, an odd count
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(launcher, "key_pairs", spy)
        first = var(q, k, v)
        second = var(q2, k2, v2)
    assert len(seen) == 2 and seen[0] == seen[1]
    torch.testing.assert_close(var(q, k, v), first, rtol=0, atol=0)
    check_against_reference(var, q2, k2, v2, backend="tvm")
    torch.testing.assert_close(var(q2, k2, v2), second, rtol=0, atol=0)


def test_converted_copies_past_the_cap_are_fresh(monkeypatch):
    monkeypatch.setattr(launcher, "WORKSPACE_MAX_BYTES", 1024)
    k = torch.randn(1, 1, 300, 16).bfloat16()
    a, b = launcher.converted(k, torch.float32, 0), launcher.converted(k, torch.float32, 0)
    assert a.data_ptr() != b.data_ptr() and torch.equal(a, k.float()) and a.is_contiguous()


@pytest.mark.parametrize("pair_dots", [True, False])
def test_threads_convert_into_workspaces_of_their_own(pair_dots: bool, request):
    """Two threads running bfloat16 calls at once, each into its own workspace (float32 copies of
    K and V; or, with pair dots, V by key pairs): each result is right."""
    import threading

    from attncc.codegen.tvm import bf16_pairs

    if not pair_dots:
        request.getfixturevalue("without_pair_dots")
    elif not bf16_pairs.on_host():
        pytest.skip("this host has no AVX-512 BF16: no key pairs")
    var = attncc.variant(mask=masks.causal)
    inputs = [up_front_qkv(torch.bfloat16, seed=s) for s in range(2)]
    expected = [var(*qkv) for qkv in inputs]
    results: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    def work(i: int) -> None:
        for _ in range(4):
            results[i].append(var(*inputs[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        assert len(results[i]) == 4
        for got in results[i]:
            torch.testing.assert_close(got, expected[i], rtol=0, atol=0)
