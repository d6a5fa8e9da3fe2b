"""Search spaces: the validity filters hold the hardware limits, defaults are always valid.

The Triton and TVM filters are checked against independent re-statements of the limits
(shared memory, registers, cache size, divisibility) over every combination of the space.
"""

from __future__ import annotations

import math

import pytest

from attncc.autotune.keys import ShapeKey, TuningKey, next_pow2
from attncc.autotune.space import SearchSpace, triton_space, tvm_space

SHAPES = [
    ShapeKey.of(1, 8, 1, 64, Lkv=4096, dtype="float16"),  # decode
    ShapeKey.of(2, 8, 16, 128, Lkv=512, dtype="bfloat16"),  # decode, wide head
    ShapeKey.of(1, 4, 100, 64),  # prefill, not a power of two
    ShapeKey.of(4, 16, 2048, 128, dtype="float16"),
    ShapeKey.of(1, 32, 512, 256, Hkv=8, dtype="float16"),  # GQA, very wide head
    ShapeKey.of(1, 1, 8, 32, Lkv=8),  # tiny
]
BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def test_shape_key_buckets_lengths_to_powers_of_two_and_keeps_head_dims_exact():
    key = ShapeKey.of(3, 6, 100, 80, Hkv=2, Lkv=1000, Dv=48)
    assert (key.batch_heads, key.q_len, key.kv_len) == (32, 128, 1024)
    assert (key.head_dim, key.value_dim, key.gqa) == (80, 48, 3)
    assert ShapeKey.parse(key.tag) == key
    assert ShapeKey.of(3, 6, 65, 80, Hkv=2, Lkv=513, Dv=48) == key  # same bucket
    assert all(next_pow2(n) >= n and next_pow2(n) & (next_pow2(n) - 1) == 0 for n in range(1, 300))


def test_shape_key_distance_never_crosses_head_dims_gqa_or_dtype():
    base = ShapeKey.of(1, 8, 128, 64)
    assert base.distance(base) == 0
    assert base.distance(ShapeKey.of(1, 8, 256, 64)) == 2  # q and kv one octave each
    for other in (ShapeKey.of(1, 8, 128, 128), ShapeKey.of(1, 8, 128, 64, Hkv=2),
                  ShapeKey.of(1, 8, 128, 64, dtype="float16")):
        assert math.isinf(base.distance(other))
    # crossing into decoding costs more than several octaves of length
    assert base.distance(ShapeKey.of(1, 8, 16, 64, Lkv=128)) > base.distance(ShapeKey.of(1, 8, 1024, 64))


def test_bad_shapes_and_keys_are_clear_errors():
    with pytest.raises(ValueError, match="Hkv"):
        ShapeKey.of(1, 6, 16, 64, Hkv=4)
    with pytest.raises(ValueError, match="dtype"):
        ShapeKey.of(1, 6, 16, 64, dtype="int8")
    with pytest.raises(ValueError, match="shape bucket"):
        ShapeKey.parse("q128")
    with pytest.raises(ValueError, match="FINGERPRINT/BACKEND/DEVICE/SHAPE"):
        TuningKey.parse("abc/tvm")
    key = TuningKey("f" * 64, "tvm", "cpu-0123456789abcdef", ShapeKey.of(1, 2, 64, 32))
    assert TuningKey.parse(key.text) == key


def _triton_valid_independently(c: dict, s: ShapeKey, smem: int, regs: int) -> bool:
    """The limits stated once more, without the space's helpers."""
    elem = BYTES[s.dtype]
    shared = elem * (c["BLOCK_M"] * s.head_dim + c["num_stages"] * c["BLOCK_N"] * (s.head_dim + s.value_dim))
    live_fp32 = c["BLOCK_M"] * s.value_dim + c["BLOCK_M"] * c["BLOCK_N"] + c["BLOCK_M"] * s.head_dim * elem / 4
    return (
        shared <= smem
        and live_fp32 / (32 * c["num_warps"]) <= regs
        and c["BLOCK_M"] <= max(16, s.q_len) and c["BLOCK_N"] <= max(16, s.kv_len)
        and 4 * c["BLOCK_M"] >= 16 * c["num_warps"]
        and (c["SPLIT_KV"] == 1 or s.q_len <= 16)
        and max(16, s.kv_len) // c["SPLIT_KV"] >= c["BLOCK_N"]  # one padded tile at least
    )


@pytest.mark.parametrize("smem", [49152, 101376, 232448])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.tag)
def test_triton_space_prunes_exactly_by_shared_memory_registers_and_decode(shape, smem):
    space = triton_space(smem_bytes=smem)
    valid = space.configs(shape)
    expected = [c for c in space if _triton_valid_independently(c, shape, smem, 200)]
    assert valid == expected
    if shape.head_dim <= 128:
        assert valid, "a realistic shape must keep some configs"
    if valid:
        assert space.default_for(shape) in valid


def test_triton_split_kv_is_tuned_only_for_decoding():
    space = triton_space()
    prefill, decode = ShapeKey.of(1, 8, 512, 64), ShapeKey.of(1, 8, 1, 64, Lkv=8192)
    assert {c["SPLIT_KV"] for c in space.configs(prefill)} == {1}
    assert {c["SPLIT_KV"] for c in space.configs(decode)} > {1, 2, 4}
    assert space.default_for(decode)["SPLIT_KV"] > 1  # few rows, long cache: split by default


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.tag)
def test_tvm_space_keeps_vectors_dividing_head_dims_and_tiles_within_cache(shape):
    cache_bytes = 256 * 1024
    space = tvm_space(cache_bytes=cache_bytes)
    for config in space:
        elem = 4 if shape.dtype == "float32" else 2
        tq, tk = config["tile_q"], config["tile_kv"]
        working = elem * (tq * shape.head_dim + tk * (shape.head_dim + shape.value_dim)) + 4 * (tq * tk + tq * shape.value_dim)
        expected = (
            shape.head_dim % config["vector"] == 0 and shape.value_dim % config["vector"] == 0
            and working <= cache_bytes and tq <= shape.q_len and tk <= max(16, shape.kv_len)
            and (config["unroll"] == 1 or tk % config["unroll"] == 0)
            and (config["grain"] == 1 or shape.batch_heads * (shape.q_len // tq) >= 2 * config["grain"])
        )
        assert (space.problem(config, shape) is None) == expected, config
    assert space.problem(space.default_for(shape), shape) is None


def test_default_that_violates_keep_falls_back_to_first_valid_config():
    space = SearchSpace({"a": (1, 2, 3), "b": (4, 8)}, keep=lambda c, s: c["a"] * c["b"] >= 12,
                        default=lambda s: {"a": 1, "b": 4})
    assert space.default_for(ShapeKey.of(1, 1, 8, 8)) == {"a": 2, "b": 8}
    assert space.size() == 6 and space.size(ShapeKey.of(1, 1, 8, 8)) == 3


def test_empty_space_and_malformed_params_are_clear_errors():
    never = SearchSpace({"a": (1,)}, keep=lambda c, s: False, name="never")
    with pytest.raises(ValueError, match="'never' has no valid config"):
        never.default_for(ShapeKey.of(1, 1, 8, 8))
    with pytest.raises(ValueError, match="non-empty tuple"):
        SearchSpace({"a": [1, 2]})
    with pytest.raises(ValueError, match="JSON scalars"):
        SearchSpace({"a": (None,)})
    with pytest.raises(ValueError, match="non-empty dict"):
        SearchSpace({})


def test_problem_rejects_unknown_knobs_foreign_values_and_bool_for_int():
    space = SearchSpace({"tile": (1, 2), "fast": (False, True)})
    shape = ShapeKey.of(1, 1, 8, 8)
    assert space.problem({"tile": 1, "fast": True}, shape) is None
    assert "knobs" in space.problem({"tile": 1}, shape)
    assert "not one of" in space.problem({"tile": 3, "fast": True}, shape)
    assert "not one of" in space.problem({"tile": True, "fast": True}, shape)  # True == 1, but not a tile
    assert "not one of" in space.problem({"tile": 1, "fast": 1}, shape)
    assert "dict" in space.problem(["tile"], shape)


def test_keep_that_raises_counts_as_invalid_not_as_a_crash():
    space = SearchSpace({"a": (0, 1)}, keep=lambda c, s: 1 / c["a"] > 0)
    assert space.configs(ShapeKey.of(1, 1, 8, 8)) == [{"a": 1}]
