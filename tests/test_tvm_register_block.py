"""``RegisterBlock``, the one writer of every register-blocked product in the TVM kernels: what it
writes compiles, and a product written with it computes the product."""

from __future__ import annotations

import pytest
import torch

tvm = pytest.importorskip("tvm")

from attncc.codegen.tvm.kernels import Lines  # noqa: E402
from attncc.codegen.tvm.launcher import compile_source, host_target  # noqa: E402
from attncc.codegen.tvm.register_block import RegisterBlock  # noqa: E402


def product_source(M: int, N: int, K: int, rows: int, lanes: int) -> str:
    """``C = A @ B + C`` over ``rows x lanes`` register blocks, the kernels' pattern."""
    w = Lines()
    w("@T.prim_func")
    w("def attn(a_h: T.handle, b_h: T.handle, c_h: T.handle):")
    with w:
        w('T.func_attr({"global_symbol": "attn", "tirx.noalias": True})')
        w(f'A = T.match_buffer(a_h, ({M}, {K}), "float32")')
        w(f'B = T.match_buffer(b_h, ({K}, {N}), "float32")')
        w(f'C = T.match_buffer(c_h, ({M}, {N}), "float32")')
        block = RegisterBlock.of("Cr", ("i1", rows), ("j1", lanes))
        target = f"C[i0 * {rows} + i1, j0 * {lanes} + j1]"
        with w.block(f"for i0 in range({M // rows}):"):
            with w.block(f"for j0 in range({N // lanes}):"):
                block.declare(w)
                block.fill(w, target)
                block.accumulate(w, f"A[i0 * {rows} + i1, k] * B[k, j0 * {lanes} + j1]", ("k", "range", K))
                block.store(w, target)
    return w.text()


@pytest.mark.parametrize(("rows", "lanes"), [(4, 16), (2, 8), (1, 8)])
def test_a_register_blocked_product_computes_the_product(rows: int, lanes: int) -> None:
    M, N, K = 8, 32, 24
    module = compile_source(product_source(M, N, K, rows, lanes), host_target())
    a, b, c = torch.randn(M, K), torch.randn(K, N), torch.randn(M, N)
    expected = c + a @ b
    module["attn"](a, b, c)
    torch.testing.assert_close(c, expected, rtol=1e-5, atol=1e-5)


def test_what_a_block_writes() -> None:
    w = Lines()
    block = RegisterBlock("P", (("r", "T.unroll", 2), ("l", "T.vectorized", 8)))
    block.declare(w)
    block.accumulate(w, "X[r, k, l]", ("k", "range", "lo, hi"))
    assert w.text().splitlines() == [
        'P = T.decl_buffer((2, 8), "float32", scope="local")',
        "for k in range(lo, hi):",
        "    for r in T.unroll(2):",
        "        for l in T.vectorized(8):",
        "            P[r, l] = P[r, l] + X[r, k, l]",
    ]
    assert RegisterBlock("S", (("l", "T.vectorized", 8),)).at == "S[l]"
    one = Lines()
    RegisterBlock("S", (("l", "T.vectorized", 8),)).declare(one)
    assert one.text() == 'S = T.decl_buffer((8,), "float32", scope="local")\n'
