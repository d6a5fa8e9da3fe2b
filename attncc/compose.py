"""Graphs of several attentions and combine nodes, such as differential attention.

    g = attncc.GraphBuilder("diff_attn")
    q1, k1, q2, k2, v = g.inputs("q1", "k1", "q2", "k2", "v")
    lam = g.scalar("lam")
    o1 = g.attention(q1, k1, v, mask=causal)
    o2 = g.attention(q2, k2, v, mask=causal)
    program = g.build(o1 - lam * o2)
    out = program(q1=..., k1=..., q2=..., k2=..., v=..., lam=torch.tensor(0.8))

Handles support ``+ - *`` and ``/`` with each other, with Python numbers and with scalar
inputs; the arithmetic becomes one ``Combine`` node over the attention outputs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from attncc.ir import expr as ex
from attncc.ir import nodes
from attncc.ir.expr import Expr, TensorSpec
from attncc.ir.graph import AttentionGraph
from attncc.ir.trace import Captures
from attncc.opaque import opaque_to_dynamo
from attncc.variant import Program, add_attention, lower_attention


@dataclass(frozen=True)
class TensorHandle:
    """A q, k or v input of the graph."""

    name: str


@dataclass(frozen=True)
class OutputHandle:
    """An attention output or an arithmetic combination of outputs and scalars."""

    expr: Expr
    builder: GraphBuilder

    def _combine(self, other: Any, op: str, reflected: bool = False) -> OutputHandle:
        right = self.builder._operand(other)
        left, right = (right, self.expr) if reflected else (self.expr, right)
        return OutputHandle(ex.binary(op, left, right), self.builder)

    def __add__(self, o: Any) -> OutputHandle: return self._combine(o, "add")
    def __radd__(self, o: Any) -> OutputHandle: return self._combine(o, "add", True)
    def __sub__(self, o: Any) -> OutputHandle: return self._combine(o, "sub")
    def __rsub__(self, o: Any) -> OutputHandle: return self._combine(o, "sub", True)
    def __mul__(self, o: Any) -> OutputHandle: return self._combine(o, "mul")
    def __rmul__(self, o: Any) -> OutputHandle: return self._combine(o, "mul", True)
    def __truediv__(self, o: Any) -> OutputHandle: return self._combine(o, "truediv")
    def __rtruediv__(self, o: Any) -> OutputHandle: return self._combine(o, "truediv", True)
    def __neg__(self) -> OutputHandle: return OutputHandle(ex.unary("neg", self.expr), self.builder)


@dataclass(frozen=True)
class ScalarHandle:
    """A 0-dim float tensor input (a learned lambda), usable in output arithmetic."""

    spec: TensorSpec
    builder: GraphBuilder

    @property
    def expr(self) -> Expr:
        return ex.load(ex.input_ref(self.spec), ())

    def _as_output(self) -> OutputHandle:
        return OutputHandle(self.expr, self.builder)

    def __mul__(self, o: Any) -> OutputHandle: return self._as_output() * o
    def __rmul__(self, o: Any) -> OutputHandle: return o * self._as_output()
    def __add__(self, o: Any) -> OutputHandle: return self._as_output() + o
    def __radd__(self, o: Any) -> OutputHandle: return o + self._as_output()
    def __sub__(self, o: Any) -> OutputHandle: return self._as_output() - o
    def __rsub__(self, o: Any) -> OutputHandle: return o - self._as_output()
    def __truediv__(self, o: Any) -> OutputHandle: return self._as_output() / o
    def __rtruediv__(self, o: Any) -> OutputHandle: return o / self._as_output()
    def __neg__(self) -> OutputHandle: return -self._as_output()


class GraphBuilder:
    """Builds a ``Program`` of several attention nodes joined by one combine node."""

    def __init__(self, name: str = "graph") -> None:
        self.graph = AttentionGraph(name)
        self.captures = Captures()
        self._outputs: dict[str, str] = {}  # output var name -> attention node id

    def inputs(self, *names: str) -> tuple[TensorHandle, ...]:
        for name in names:
            self.graph.add(name, nodes.Input(name, "tensor"))
        return tuple(TensorHandle(n) for n in names)

    def scalar(self, name: str) -> ScalarHandle:
        if re.fullmatch(r"o\d+", name):
            raise ValueError(f"scalar name {name!r} is taken: o0, o1, ... name the attention outputs")
        spec = TensorSpec(name, (), "float32")
        self.graph.add(name, nodes.Input(name, "scalar", spec))
        return ScalarHandle(spec, self)

    def attention(
        self, q: TensorHandle, k: TensorHandle, v: TensorHandle, score_fn: Callable[..., Any] | None = None, *,
        mask: Callable[..., Any] | None = None, normalizer: Any = "softmax", routing: Any = None,
    ) -> OutputHandle:
        payloads = lower_attention(self.captures, score_fn=score_fn, mask=mask, normalizer=normalizer, routing=routing)
        node_id = add_attention(self.graph, payloads, q=q.name, k=k.name, v=v.name)
        var_name = f"o{len(self._outputs)}"
        self._outputs[var_name] = node_id
        return OutputHandle(ex.var(var_name, "float"), self)

    def _operand(self, value: Any) -> Expr:
        if isinstance(value, OutputHandle | ScalarHandle):
            return value.expr
        if isinstance(value, int | float) and not isinstance(value, bool):
            return ex.const(float(value))
        raise TypeError(f"cannot combine attention outputs with {type(value).__name__}")

    def build(self, output: OutputHandle) -> ComposedProgram:
        if not isinstance(output, OutputHandle):
            raise TypeError(
                f"build() expects an attention output or a combination of them, got {type(output).__name__}"
            )
        if output.expr.op == "var":
            self.graph.outputs.append(self._outputs[output.expr.arg])
        else:
            used = sorted(output.expr.free_vars())
            operands = {name: self._outputs[name] for name in used}
            scalars = {spec.name: spec.name for spec in output.expr.inputs()}
            combine = self.graph.add(self.graph.fresh_id("combine"), nodes.Combine(output.expr), **operands, **scalars)
            self.graph.outputs.append(combine)
        return ComposedProgram(self.graph, self.captures.tensors)


class ComposedProgram(Program):
    """Call with every graph input by keyword: ``program(q1=..., k1=..., v=..., lam=...)``."""

    @opaque_to_dynamo  # as Variant.__call__
    def __call__(self, *, scale: float | None = None, q_offset: int = 0, backend: str | None = None,
                 return_lse: bool = False, **tensors: torch.Tensor) -> torch.Tensor:
        roles = self.operand_roles()
        expected = {n for n, r in roles.items() if r in ("tensor", "scalar")}
        missing, unknown = expected - tensors.keys(), tensors.keys() - expected
        if missing or unknown:
            raise TypeError(f"{self.name}: missing inputs {sorted(missing)}, unexpected {sorted(unknown)}; "
                            f"expected {sorted(expected)}")
        scalars = {n: t for n, t in tensors.items() if roles[n] == "scalar"}
        for name, t in scalars.items():
            if not isinstance(t, torch.Tensor) or t.numel() != 1:
                raise TypeError(f"{name} must be a one-element tensor")
        self.tensors.update({n: t.reshape(()) for n, t in scalars.items()})
        operands = {n: t for n, t in tensors.items() if roles[n] == "tensor"}
        return self.run(operands, scale=scale, q_offset=q_offset, backend=backend, return_lse=return_lse)
