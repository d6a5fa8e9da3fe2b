"""The attncc IR: expressions, node payloads, the attention graph, tracing, verification."""

from attncc.ir.expr import Expr, TensorSpec
from attncc.ir.graph import AttentionGraph
from attncc.ir.verify import VerifyError, verify

__all__ = ["AttentionGraph", "Expr", "TensorSpec", "VerifyError", "verify"]
