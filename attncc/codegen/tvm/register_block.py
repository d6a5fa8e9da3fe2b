"""Register blocks: float32 sums a generated kernel keeps in registers across a reduction loop.

Why one piece: every product in the TVM kernels (the forward's scores and values, the
backward's five, linear attention's state and outputs, the decoding kernel's lane sums) is
the same code: a small local buffer indexed by its own loops (unrolled rows, vectorized
lanes), filled, accumulated over a loop, read back. Written once here, each kernel names only
what it multiplies; LLVM keeps such a buffer in vector registers when its loops are unrolled
and vectorized as declared.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from attncc.codegen.tvm.kernels import Lines

# (variable, kind, extent): kind is ``range``, ``T.unroll`` or ``T.vectorized``; a ``range``
# extent may be ``"start, stop"``
Loop = tuple[str, str, "int | str"]


@contextlib.contextmanager
def nest(w: Lines, *loops: Loop) -> Iterator[None]:
    """Nested ``for`` loops, outermost first."""
    with contextlib.ExitStack() as stack:
        for var, kind, extent in loops:
            stack.enter_context(w.block(f"for {var} in {kind}({extent}):"))
        yield


@dataclass(frozen=True)
class RegisterBlock:
    """A local float32 buffer ``name`` indexed by the variables of its own ``loops``."""

    name: str
    loops: tuple[Loop, ...]

    @classmethod
    def of(cls, name: str, rows: tuple[str, int], lanes: tuple[str, int]) -> RegisterBlock:
        """``rows[1]`` unrolled rows (variable ``rows[0]``) of ``lanes[1]`` vectorized lanes."""
        return cls(name, ((rows[0], "T.unroll", rows[1]), (lanes[0], "T.vectorized", lanes[1])))

    @property
    def at(self) -> str:
        """The element the innermost loop body sees, e.g. ``Sr[j1, i1]``."""
        return f"{self.name}[{', '.join(var for var, _, _ in self.loops)}]"

    def declare(self, w: Lines) -> None:
        shape = ", ".join(str(extent) for _, _, extent in self.loops)
        w(f'{self.name} = T.decl_buffer(({shape}{"," if len(self.loops) == 1 else ""}), "float32", scope="local")')

    def each(self, w: Lines, *outer: Loop) -> contextlib.AbstractContextManager[None]:
        """The block's loops, inside ``outer`` ones: a body written here runs once per element."""
        return nest(w, *outer, *self.loops)

    def fill(self, w: Lines, value: str) -> None:
        with self.each(w):
            w(f"{self.at} = {value}")

    def accumulate(self, w: Lines, term: str, *over: Loop) -> None:
        """``block += term`` for every iteration of the ``over`` loops (the reduction)."""
        with self.each(w, *over):
            w(f"{self.at} = {self.at} + {term}")

    def store(self, w: Lines, target: str) -> None:
        """``target = block`` element by element (``target`` indexed by the block's variables)."""
        with self.each(w):
            w(f"{target} = {self.at}")
