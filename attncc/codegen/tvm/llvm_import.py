"""Vector helpers written in LLVM IR, imported into a kernel's module and called on 16 lanes.

Why: some x86 instructions the kernels want cannot be reached through TVM 0.27's own calls.
Its bfloat16 vectors are ``<32 x i16>`` where LLVM's AVX-512 BF16 intrinsics take ``<32 x
bfloat>`` (``bf16_pairs``), and its vectorizer turns an intrinsic's immediate arguments (a
rounding mode, a lane mask) into vectors, which LLVM refuses (``vector_exp``). So each helper
module defines small ``alwaysinline`` functions of ``<16 x float>`` in LLVM IR; a kernel that
uses them wraps its body in that module's ``import_statement`` (``pragma_import_llvm``) and calls
them as externs on explicit float32x16 values (``lanes``); LLVM inlines them, so the assembly
holds the instructions themselves and no call.
"""

from __future__ import annotations

LANES = 16  # float32 lanes of one AVX-512 register


def import_statement(llvm_ir: str) -> str:
    """The TVMScript ``with`` header that puts ``llvm_ir``'s functions into the kernel's module."""
    return f'with T.attr(0, "pragma_import_llvm", {llvm_ir!r}):'


def call(function: str, *args: str) -> str:
    """A call of an imported function of float32x16 arguments that returns float32x16."""
    return f'T.call_extern("float32x{LANES}", "{function}", {", ".join(args)})'


def lanes(buffer: str, *index: str, first: str = "0") -> str:
    """A float32x16 load or store of ``buffer[*index, first : first + 16]``."""
    return f"{buffer}[{', '.join((*index, f'T.Ramp({first}, 1, {LANES})'))}]"
