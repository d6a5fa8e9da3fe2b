"""bfloat16 products by pairs of features: AVX-512 BF16's ``vdpbf16ps``.

``vdpbf16ps acc, a, b`` adds ``a[2l] b[2l] + a[2l+1] b[2l+1]`` to float32 lane ``l``: 32
bfloat16 products per instruction, twice a float32 FMA's 16, with float32 accumulation. The
forward kernel (``KernelShape.pair_dots``) uses it for both products:

- scores: ``a`` holds, per query row, a pair of its features (Q's rows read as 32-bit words and
  transposed), ``b`` one key's same pair broadcast (K read in place as words);
- values: ``a`` holds, per value column, the values of two consecutive keys (V laid out by key
  pairs once per call, ``launcher.key_pairs``), ``b`` a row's two weights broadcast, rounded to
  bfloat16 (``vcvtne2ps2bf16``; FlashAttention rounds P to the inputs' dtype likewise). Row sums
  stay float32.

The backward (``BackwardShape.pair_dots``) uses it for its five products: by feature pairs for S
and dP, by row pairs for dV and dK (``rounded_pairs`` of two rows), by key pairs for dQ
(``rounded_run`` of one row's consecutive keys).

Why LLVM IR: TVM 0.27 types bfloat16 vectors as ``<32 x i16>`` while LLVM's intrinsics take
``<32 x bfloat>``, so a ``call_llvm_intrin`` fails to verify. The two instructions are wrapped in
three functions of float32 words (``llvm_import``); LLVM inlines them (one instruction each,
plus a shuffle for the interleaved rounding).
"""

from __future__ import annotations

import functools

from attncc.codegen.tvm import llvm_import

LANES = llvm_import.LANES  # float32 lanes of one instruction
DOT = "attncc_dot_pairs"
ROUND = "attncc_bf16_pairs"
RUN = "attncc_bf16_run"

_INTERLEAVE = ", ".join(f"i32 {k}" for lane in range(LANES) for k in (lane, LANES + lane))
LLVM_IR = f"""
define internal <16 x float> @{DOT}(<16 x float> %acc, <16 x float> %a, <16 x float> %b) alwaysinline {{
  %x = bitcast <16 x float> %a to <32 x bfloat>
  %y = bitcast <16 x float> %b to <32 x bfloat>
  %r = call <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float> %acc, <32 x bfloat> %x, <32 x bfloat> %y)
  ret <16 x float> %r
}}
define internal <16 x float> @{ROUND}(<16 x float> %lo, <16 x float> %hi) alwaysinline {{
  %c = call <32 x bfloat> @llvm.x86.avx512bf16.cvtne2ps2bf16.512(<16 x float> %hi, <16 x float> %lo)
  %s = shufflevector <32 x bfloat> %c, <32 x bfloat> poison, <32 x i32> <{_INTERLEAVE}>
  %r = bitcast <32 x bfloat> %s to <16 x float>
  ret <16 x float> %r
}}
define internal <16 x float> @{RUN}(<16 x float> %lo, <16 x float> %hi) alwaysinline {{
  %c = call <32 x bfloat> @llvm.x86.avx512bf16.cvtne2ps2bf16.512(<16 x float> %hi, <16 x float> %lo)
  %r = bitcast <32 x bfloat> %c to <16 x float>
  ret <16 x float> %r
}}
declare <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float>, <32 x bfloat>, <32 x bfloat>)
declare <32 x bfloat> @llvm.x86.avx512bf16.cvtne2ps2bf16.512(<16 x float>, <16 x float>)
"""


@functools.cache
def on_host() -> bool:
    """Whether the kernels' target, this host's CPU, has AVX-512 BF16."""
    from attncc.codegen.tvm.launcher import host_has_feature

    return host_has_feature("avx512bf16")


def import_statement() -> str:
    """The TVMScript ``with`` header that puts the functions into the kernel's module."""
    return llvm_import.import_statement(LLVM_IR)


def dot(acc: str, a: str, b: str) -> str:
    """``acc + pair products of a and b``, each a float32x16 expression of bfloat16 pairs."""
    return llvm_import.call(DOT, acc, a, b)


def accumulate(acc: str, values: str, word: str) -> str:
    """The statement ``acc += pair products of values and one word broadcast``: ``acc`` and
    ``values`` float32x16 accesses, ``word`` a scalar word (a pair of bfloat16) every lane shares."""
    return f"{acc} = {dot(acc, values, f'T.Broadcast({word}, {LANES})')}"


def rounded_run(lo: str, hi: str) -> str:
    """32 consecutive float32 values (``lo`` the first 16, ``hi`` the next) rounded to bfloat16 in
    their order: word ``l`` holds values ``2l`` and ``2l + 1``."""
    return llvm_import.call(RUN, lo, hi)


def rounded_pairs(lo: str, hi: str) -> str:
    """Two float32x16 expressions rounded to bfloat16 and interleaved: lane ``l`` of the result
    holds ``(lo[l], hi[l])`` as one 32-bit word."""
    return llvm_import.call(ROUND, lo, hi)


def rounded_in_float32(x: str) -> str:
    """``x`` (float32, finite) rounded to the nearest bfloat16, ties to even, kept as float32: the
    value ``rounded_pairs`` will pack, exactly.

    Why: a normalized pointwise row divides ``sum P V`` by ``sum P``. With P rounded for the
    value product and the sum taken unrounded, a row of few keys was off by a weight's rounding
    (2**-9 relative): one bfloat16 step past FlashAttention's bound in 3 of 200 random softplus
    rows. Summing the rounded weights makes the row's weights sum to 1 again.
    """
    bits = f'T.reinterpret("int32", {x})'
    odd = f"T.bitwise_and(T.shift_right({bits}, 16), T.int32(1))"
    return f'T.reinterpret("float32", T.bitwise_and({bits} + T.int32(32767) + {odd}, T.int32(-65536)))'
