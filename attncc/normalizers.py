"""User-facing normalizer specs; each lowers to one IR payload (SEMANTICS.md, "Normalizers")."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from attncc.ir import nodes
from attncc.ir.trace import Captures, trace_pointwise

# NOTE: the named pointwise maps are ordinary traced functions, so "relu" and
# Pointwise(torch.relu) are the same IR and share a fingerprint.
NAMED_PHI: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "softplus": F.softplus,
    "relu": torch.relu,
    "relu2": lambda s: torch.relu(s) * torch.relu(s),
}
FEATURE_MAPS = ("elu1", "relu", "identity")
KNOWN_NAMES = ("softmax", "sigmoid", "softplus", "relu", "relu2", "stick_breaking")


@dataclass(frozen=True, eq=False)
class Softmax:
    """Softmax, optionally with learned per-head sink logits ``sink: [Hq]`` (gpt-oss, StreamingLLM)."""

    sink: torch.Tensor | None = None

    def lower(self, captures: Captures) -> nodes.SoftmaxNorm:
        if self.sink is None:
            return nodes.SoftmaxNorm()
        _check_head_vector(self.sink, "Softmax(sink=...)")
        return nodes.SoftmaxNorm(sink=captures.add(self.sink, "sink"))


@dataclass(frozen=True)
class Sigmoid:
    """Sigmoid attention (Ramapuram et al. 2024); ``bias`` defaults to ``-ln(Lkv)``."""

    bias: float | None = None

    def lower(self, captures: Captures) -> nodes.SigmoidNorm:
        if self.bias is not None and not isinstance(self.bias, int | float):
            raise TypeError(f"Sigmoid(bias=...) expects a float, got {type(self.bias).__name__}")
        return nodes.SigmoidNorm(None if self.bias is None else float(self.bias))


@dataclass(frozen=True, eq=False)
class Pointwise:
    """``phi(score)``, divided by its row sum when ``normalize``; ``phi`` traced or named."""

    phi: Callable[..., Any] | str
    normalize: bool = True

    def lower(self, captures: Captures) -> nodes.PointwiseNorm:
        name = self.phi if isinstance(self.phi, str) else None
        if name is not None and name not in NAMED_PHI:
            raise ValueError(f"Pointwise(phi={name!r}): known names are {sorted(NAMED_PHI)}")
        fn = NAMED_PHI[name] if name else self.phi
        if not callable(fn):
            raise TypeError(f"Pointwise(phi=...) expects a callable or a name, got {type(fn).__name__}")
        return nodes.PointwiseNorm(trace_pointwise(fn, captures), bool(self.normalize), name)


@dataclass(frozen=True)
class StickBreaking:
    """Stick-breaking attention (Tan et al. 2024), in log space, by descending kv_idx."""

    def lower(self, captures: Captures) -> nodes.StickBreakingNorm:
        return nodes.StickBreakingNorm()


@dataclass(frozen=True, eq=False)
class Linear:
    """Linear attention ``phi(q).phi(k)`` with optional per-head decay (RetNet, Lightning)."""

    feature_map: str | Callable[..., Any] = "elu1"
    normalize: bool = True
    decay: torch.Tensor | None = None

    def lower(self, captures: Captures) -> nodes.LinearNorm:
        feature_map: Any = self.feature_map
        if isinstance(feature_map, str):
            if feature_map not in FEATURE_MAPS:
                raise ValueError(f"Linear(feature_map={feature_map!r}): expected one of {FEATURE_MAPS} or a callable")
        elif callable(feature_map):
            feature_map = trace_pointwise(feature_map, captures, arg="x")
        else:
            raise TypeError(f"Linear(feature_map=...) expects a name or a callable, got {type(feature_map).__name__}")
        decay = None
        if self.decay is not None:
            _check_head_vector(self.decay, "Linear(decay=...)")
            decay = captures.add(self.decay, "decay")
        return nodes.LinearNorm(feature_map, bool(self.normalize), decay)


def _check_head_vector(tensor: Any, what: str) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 1 or not tensor.is_floating_point():
        raise TypeError(f"{what} expects a 1-D float tensor of shape [Hq]")


def as_normalizer(value: Any) -> Softmax | Sigmoid | Pointwise | StickBreaking | Linear:
    """Accept a name or a spec object; reject anything else with the list of known names."""
    if isinstance(value, Softmax | Sigmoid | Pointwise | StickBreaking | Linear):
        return value
    if isinstance(value, str):
        if value == "softmax":
            return Softmax()
        if value == "sigmoid":
            return Sigmoid()
        if value == "stick_breaking":
            return StickBreaking()
        if value in NAMED_PHI:
            return Pointwise(value, normalize=True)
        raise ValueError(f"normalizer={value!r} is unknown; known names: {', '.join(KNOWN_NAMES)}")
    raise TypeError(
        f"normalizer must be a name ({', '.join(KNOWN_NAMES)}) or attncc.Softmax/Sigmoid/"
        f"Pointwise/Linear, got {type(value).__name__}"
    )
