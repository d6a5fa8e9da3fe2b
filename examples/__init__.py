"""attncc's example variants: one file per variant, each citing its paper.

``EXAMPLES`` maps each example's name (its file stem) to its module path. Every module defines
a module-level attncc program under the same name as the file (``examples/alibi.py`` defines
``alibi``), the FlexAttention-style functions it is built from, and a ``main(backend=None)``
that runs it on small random tensors and checks it against the reference backend. Captured
tensors are deterministic (seeded) and sized for the module's default ``SEQ_LEN`` (256).

    from examples import load_variants
    for name, program in load_variants().items(): ...   # "alibi", "relu_attention:relu_attention_normalized", ...

The CLI names one directly: ``attncc explain examples/alibi.py:alibi``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

EXAMPLES_DIR = Path(__file__).resolve().parent

_NAMES = (
    "causal", "sliding_window", "alibi", "softcapping", "document_masking", "prefix_lm", "strided",
    "dilated_window", "neighborhood_2d", "streaming_llm", "relative_position_bias", "sigmoid_attention",
    "softmax_sinks", "stick_breaking", "softplus_attention", "relu_attention", "linear_attention",
    "moba", "moh", "differential_attention", "chunked_attention", "cross_attention_padding", "moa",
    "lightning_attention",
)

EXAMPLES: dict[str, str] = {name: f"examples.{name}" for name in _NAMES}
"""Example name -> module path (importable with the repository root on ``sys.path``)."""


def example_file(name: str) -> Path:
    """The example's source file, for ``attncc explain FILE:NAME``."""
    _check_name(name)
    return EXAMPLES_DIR / f"{name}.py"


def load_module(name: str) -> ModuleType:
    _check_name(name)
    package = __package__ or "examples"
    return importlib.import_module(f"{package}.{name}")


def load_variants(names: list[str] | None = None) -> dict[str, object]:
    """Every attncc program defined at module level in the examples.

    Keys are ``"<example>"`` for the example's main program and ``"<example>:<variable>"``
    for the others it defines (e.g. ``"relu_attention:relu_attention_normalized"``).
    """
    from attncc.variant import Program

    programs: dict[str, object] = {}
    for name in names if names is not None else list(EXAMPLES):
        module = load_module(name)
        for attr, value in vars(module).items():
            if isinstance(value, Program):
                programs[name if attr == name else f"{name}:{attr}"] = value
        if name not in programs:
            raise LookupError(f"example {name!r} defines no attncc program named {name!r}")
    return programs


def main_variants() -> dict[str, object]:
    """Each example's main program, by example name."""
    return {name: program for name, program in load_variants().items() if ":" not in name}


def _check_name(name: str) -> None:
    if name not in EXAMPLES:
        raise KeyError(f"unknown example {name!r}; known examples: {', '.join(EXAMPLES)}")
