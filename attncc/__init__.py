"""attncc: a compiler for attention variants.

Declare a variant with FlexAttention-style functions; attncc traces it into an IR,
proves its block sparsity, fuses it into one kernel and runs it on the best backend.
"""

from attncc import masks
from attncc.blocks import block_map
from attncc.compose import ComposedProgram, GraphBuilder
from attncc.normalizers import Linear, Pointwise, Sigmoid, Softmax, StickBreaking
from attncc.routing import TopKBlocks, TopKHeads
from attncc.variant import Program, Variant, variant

__version__ = "0.1.0"

__all__ = [
    "ComposedProgram", "GraphBuilder", "Linear", "Pointwise", "Program", "Sigmoid", "Softmax",
    "StickBreaking", "TopKBlocks", "TopKHeads", "Variant", "block_map", "masks", "variant",
]
