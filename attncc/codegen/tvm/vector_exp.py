"""``2**x`` of 16 float32 lanes in seven AVX-512 instructions: softmax's and stick-breaking's exponentials.

``vreduceps`` gives ``f = x - floor(x)`` in ``[0, 1)``, five FMAs give ``2**f`` by a polynomial,
and ``vscalefps`` multiplies it by ``2**floor(x)``, reading ``x`` itself. The portable form
(``render.fast_exp2_nonpositive``) needs twelve: a clamp, a rounding, a subtraction, and a
conversion, shift, add and multiply to build ``2**n``. ``vscalefps`` also settles the ends
without a select: ``-inf`` (a masked score) and anything below about -150 give exactly 0,
``+inf`` gives ``inf``, NaN stays NaN.

Measured on the Zen 4 host: the exponential pass went from 6.1% to 5.2% of a document kernel's
samples (it is bound by its multiply-adds now); whole calls 1.2-1.7% faster (document, causal and
ALiBi at L=2048, paired medians); stick-breaking, whose walk over keys computes two per score,
1.32x (L=4096). Used where the target has AVX-512F and DQ (``on_host``) and the kernel's vectors
are 16 rows (``KernelShape.vector_exp``).
"""

from __future__ import annotations

import functools
import struct

from attncc.codegen.tvm import llvm_import
from attncc.codegen.tvm.render import LOG2E

EXP2 = "attncc_exp2"

# 2**f on [0, 1) by a degree-5 polynomial fitted for relative error (reweighted least squares on
# Chebyshev nodes, as render._EXP2_MINIMAX5 on [-1/2, 1/2]) with its constant term held at 1, so
# that 2**0 is exactly 1 (a row's max weighs 1 and a live row's sum is at least 1, which the
# softmax's finish relies on): at most 8.3e-8 relative, 1.5e-7 evaluated in float32
EXP2_UNIT = (1.0, 0.6931513118115527, 0.24016445010342286, 0.05579991323163916, 0.009017030192545461,
             0.0018671301165766457)


def _splat(value: float) -> str:
    """An LLVM ``<16 x float>`` constant of ``value`` rounded to float32 (LLVM writes a float
    literal as the hex of the double it equals)."""
    single = struct.unpack("<f", struct.pack("<f", value))[0]
    bits = struct.unpack("<Q", struct.pack("<d", single))[0]
    return f"splat (float 0x{bits:016X})"


def _horner() -> str:
    """The polynomial's FMAs, ``%p0`` the last."""
    lines, poly = [], _splat(EXP2_UNIT[-1])
    for k in range(len(EXP2_UNIT) - 2, -1, -1):
        lines.append(f"  %p{k} = call <16 x float> @llvm.fma.v16f32(<16 x float> {poly}, <16 x float> %f, "
                     f"<16 x float> {_splat(EXP2_UNIT[k])})")
        poly = f"%p{k}"
    return "\n".join(lines)


# reduce imm 9: keep no fraction bits, round down (f = x - floor(x)); mask -1: every lane; 4: the
# current rounding mode. scalef multiplies by 2**floor of its second operand.
_TEMPLATE = """
define internal <16 x float> @{name}(<16 x float> %x) alwaysinline {{
  %f = call <16 x float> @llvm.x86.avx512.mask.reduce.ps.512(<16 x float> %x, i32 9, <16 x float> zeroinitializer,
                                                             i16 -1, i32 4)
{horner}
  %r = call <16 x float> @llvm.x86.avx512.mask.scalef.ps.512(<16 x float> %p0, <16 x float> %x,
                                                             <16 x float> zeroinitializer, i16 -1, i32 4)
  ret <16 x float> %r
}}
declare <16 x float> @llvm.x86.avx512.mask.reduce.ps.512(<16 x float>, i32, <16 x float>, i16, i32)
declare <16 x float> @llvm.x86.avx512.mask.scalef.ps.512(<16 x float>, <16 x float>, <16 x float>, i16, i32)
declare <16 x float> @llvm.fma.v16f32(<16 x float>, <16 x float>, <16 x float>)
"""


LLVM_IR = _TEMPLATE.format(name=EXP2, horner=_horner())


@functools.cache
def on_host() -> bool:
    """Whether the kernels' target, this host's CPU, has AVX-512F (``vscalefps``) and DQ
    (``vreduceps``)."""
    from attncc.codegen.tvm.launcher import host_has_feature

    return host_has_feature("avx512f") and host_has_feature("avx512dq")


def import_statement() -> str:
    """The TVMScript ``with`` header that puts ``attncc_exp2`` into the kernel's module."""
    return llvm_import.import_statement(LLVM_IR)


def exp2(x: str) -> str:
    """``2**x`` of a float32x16 expression."""
    return llvm_import.call(EXP2, x)


def exp(x: str) -> str:
    """``e**x`` of a float32x16 expression: ``2**(x log2 e)``."""
    return exp2(f"({x} * T.Broadcast(T.float32({LOG2E!r}), {llvm_import.LANES}))")
