"""``torch.compile(model, backend="attncc")``: run a model's SDPA calls through attncc.

The backend follows the contract of ``torch/_dynamo/backends/registry.py``: a callable taking
the captured ``torch.fx.GraphModule`` and example inputs and returning a callable. It rewrites
each ``scaled_dot_product_attention`` call it can express exactly as an attncc variant
(no mask or ``is_causal``, no dropout) and leaves every other node alone; the rewritten
graph then runs eagerly. Found by name through the ``torch_dynamo_backends`` entry point, and
registered on import for environments where the package is not installed.

``is_causal=True`` follows SDPA's definition, which is top-left aligned when ``Lq != Lkv``:
query ``i`` sees keys ``j <= i``, i.e. ``q_offset = 0`` (not the bottom-right alignment of
decoding with a cache).

Under ``torch.autocast`` SDPA is an autocast op: its floating inputs are cast to the autocast
dtype of their device type and the kernel runs with autocast off. The rewritten call is a plain
Python function autocast does not see, so ``attncc_sdpa`` applies that casting itself.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch.amp.autocast_mode import is_autocast_available

from attncc.variant import Variant, variant

SDPA_TARGETS: tuple[Any, ...] = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
SDPA_PARAMETERS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
SDPA_DEFAULTS: dict[str, Any] = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
                                 "enable_gqa": False}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# NOTE: counts of runtime calls by path ("attncc" or "fallback: <reason>"); tests read it.
CALLS: Counter[str] = Counter()


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@cache
def sdpa_variant(is_causal: bool) -> Variant:
    """The attncc variant equal to SDPA without a mask (or with ``is_causal``, top-left aligned)."""
    if is_causal:
        return variant(mask=_causal, name="sdpa_causal")
    return variant(name="sdpa")


def bind_sdpa_arguments(node: torch.fx.Node) -> dict[str, Any] | None:
    """The call's arguments by SDPA parameter name, defaults filled in; None if they do not bind."""
    if len(node.args) > len(SDPA_PARAMETERS) or any(k not in SDPA_PARAMETERS for k in node.kwargs):
        return None
    bound = dict(zip(SDPA_PARAMETERS, node.args))
    if any(k in bound for k in node.kwargs):
        return None
    bound.update(node.kwargs)
    if any(p not in bound for p in SDPA_PARAMETERS[:3]):
        return None
    return {**SDPA_DEFAULTS, **bound}


def untranslatable(arguments: dict[str, Any]) -> str | None:
    """Why a bound SDPA call cannot become an attncc variant at compile time, else None."""
    if arguments["attn_mask"] is not None:
        return "attn_mask is given (a runtime tensor mask or bias)"
    dropout = arguments["dropout_p"]
    if not isinstance(dropout, int | float) or dropout != 0:
        return f"dropout_p={dropout!r} is not the constant 0"
    if not isinstance(arguments["is_causal"], bool):
        return "is_causal is not a constant bool"
    if not isinstance(arguments["enable_gqa"], bool):
        return "enable_gqa is not a constant bool"
    scale = arguments["scale"]
    if scale is not None and not isinstance(scale, int | float):
        return "scale is not a constant number"
    return None


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts SDPA's inputs to on ``device_type``, or None where it is off."""
    if not is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_cast(t: Any, dtype: torch.dtype) -> Any:
    """``t`` as autocast hands it to SDPA: floating tensors other than float64 in ``dtype``."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def runtime_fallback_reason(query: Any, key: Any, value: Any, enable_gqa: bool) -> str | None:
    """Why these tensors must go to torch's SDPA after all (shapes SDPA accepts but attncc does not)."""
    tensors = (query, key, value)
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in tensors):
        return "inputs are not all 4-D tensors [B, H, L, D]"
    if any(type(t) not in (torch.Tensor, torch.nn.Parameter) for t in tensors):
        # NOTE: torch.cond traces its branches on FakeTensors (no data for a kernel to read)
        return "tensor subclasses (FakeTensor while torch traces a graph, or a user's subclass)"
    if any(t.numel() == 0 for t in tensors):
        return "empty tensors (a dimension of size 0)"
    if any(t.dtype not in FLOAT_DTYPES or t.dtype != query.dtype for t in tensors):
        return "dtypes are not one of float32/float16/bfloat16 throughout"
    if any(t.device != query.device for t in tensors):
        return "tensors on different devices"
    if key.shape[0] != query.shape[0] or value.shape[0] != query.shape[0]:
        return "batch sizes differ (SDPA broadcasts them)"
    if query.shape[1] != key.shape[1] and not enable_gqa:
        return "head counts differ without enable_gqa (SDPA broadcasts or rejects them)"
    if query.shape[1] % key.shape[1] != 0 or key.shape[1] != value.shape[1]:
        return "head counts are not a GQA ratio"
    return None


def attncc_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, is_causal: bool = False,
                scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """SDPA without mask or dropout, computed by attncc; torch's SDPA where attncc cannot run it."""
    device_type = query.device.type if isinstance(query, torch.Tensor) else None
    cast_to = autocast_dtype(device_type) if device_type is not None else None
    if cast_to is not None:
        query, key, value = (autocast_cast(t, cast_to) for t in (query, key, value))
    reason = runtime_fallback_reason(query, key, value, enable_gqa)
    if reason is not None:
        CALLS[f"fallback: {reason}"] += 1
        return F.scaled_dot_product_attention(query, key, value, is_causal=is_causal, scale=scale,
                                              enable_gqa=enable_gqa)
    CALLS["attncc"] += 1
    if cast_to is None:
        return sdpa_layout(sdpa_variant(is_causal)(query, key, value, scale=scale))
    # NOTE: as autocast runs SDPA's kernel: on the cast inputs, with autocast off inside it
    with torch.autocast(device_type, enabled=False):
        return sdpa_layout(sdpa_variant(is_causal)(query, key, value, scale=scale))


def sdpa_layout(out: torch.Tensor) -> torch.Tensor:
    """``out [B, H, L, D]`` laid out as torch's SDPA lays out its output: ``[B, L, H, D]`` in memory,
    so that a model's ``o.transpose(1, 2).view(B, L, -1)`` works compiled as it does eagerly."""
    if out.shape[1] == 1 or out.shape[2] == 1:
        return out  # the two layouts are one
    return out.transpose(1, 2).contiguous().transpose(1, 2)


def rewrite_sdpa(gm: torch.fx.GraphModule) -> int:
    """Replace every translatable SDPA call in ``gm`` and in the graphs it holds with
    ``attncc_sdpa``; returns how many. Why the held graphs: activation checkpointing and
    ``torch.cond`` put their bodies in sub-``GraphModule``s, where SDPA had kept running on torch."""
    return sum(_rewrite_graph(m) for m in gm.modules() if isinstance(m, torch.fx.GraphModule))


def _rewrite_graph(gm: torch.fx.GraphModule) -> int:
    rewritten = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in SDPA_TARGETS:
            continue
        arguments = bind_sdpa_arguments(node)
        if arguments is None or untranslatable(arguments) is not None:
            continue
        options = {name: arguments[name] for name in ("is_causal", "scale", "enable_gqa")}
        with gm.graph.inserting_after(node):
            replacement = gm.graph.call_function(
                attncc_sdpa, (arguments["query"], arguments["key"], arguments["value"]), options
            )
        replacement.meta.update(node.meta)
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
        rewritten += 1
    if rewritten:
        gm.graph.lint()
        gm.recompile()
    return rewritten


def attncc_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
    """The ``torch.compile`` backend: rewrite SDPA calls to attncc, run the graph eagerly."""
    rewrite_sdpa(gm)
    return gm.forward


def register() -> None:
    """Register the backend as "attncc" unless torch already knows it (e.g. via the entry point)."""
    from torch._dynamo.backends import registry

    # NOTE: when the entry point is being loaded, "attncc" is already in _BACKENDS and torch
    # registers the function itself; registering here too would raise "duplicate name".
    if "attncc" in registry._BACKENDS or "attncc" in registry._COMPILER_FNS:
        return
    registry.register_backend(attncc_backend, name="attncc")


try:
    register()
except Exception as _err:  # a torch without this private registry still gets the entry point
    import warnings

    warnings.warn(f"attncc: could not register the torch.compile backend by name: {_err}", stacklevel=1)
