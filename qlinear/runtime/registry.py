"""Op registry: (domain, op_type, opset range) -> kernel factory.

A factory is called once per node when a Session plans the graph. It reads the
node's attributes and constant inputs (packing weights, choosing a kernel) and
returns the callable that `Session.run` invokes with the node's input arrays.
All planning happens in the factory; the returned kernel does only arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

#: What a factory returns: called with one array per node input (None for an
#: omitted optional input); returns one array or a sequence of arrays (one per output).
Kernel = Callable[..., "np.ndarray | Sequence[np.ndarray | None]"]
Factory = Callable[["NodeSpec"], Kernel]

ONNX_DOMAIN = ""
MS_DOMAIN = "com.microsoft"


def normalize_domain(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


def attribute_value(attr: onnx.AttributeProto) -> Any:
    """An attribute as a plain Python/numpy value (strings decoded, tensors as arrays)."""
    value = helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [v.decode("utf-8") for v in value]
    return value


@dataclass
class NodeSpec:
    """Everything a factory may know about a node at plan time."""

    proto: onnx.NodeProto
    opset: int
    consts: dict[int, np.ndarray] = field(default_factory=dict)
    input_shapes: list[tuple[int | str | None, ...] | None] = field(default_factory=list)
    input_dtypes: list[np.dtype | None] = field(default_factory=list)
    num_threads: int = 0

    def __post_init__(self) -> None:
        self.attrs: dict[str, Any] = {a.name: attribute_value(a) for a in self.proto.attribute}

    @property
    def op_type(self) -> str:
        return self.proto.op_type

    @property
    def domain(self) -> str:
        return normalize_domain(self.proto.domain)

    @property
    def name(self) -> str:
        return self.proto.name

    @property
    def inputs(self) -> list[str]:
        return list(self.proto.input)

    @property
    def outputs(self) -> list[str]:
        return list(self.proto.output)

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)

    def const(self, index: int) -> np.ndarray | None:
        """The value of input `index` if it is known at plan time (initializer/Constant)."""
        return self.consts.get(index)

    def has_input(self, index: int) -> bool:
        return index < len(self.proto.input) and self.proto.input[index] != ""

    def describe(self) -> str:
        label = f"{self.domain}.{self.op_type}" if self.domain else self.op_type
        return f"node {self.name!r} ({label})" if self.name else f"unnamed {label} node"


@dataclass(frozen=True)
class _Entry:
    since: int
    until: int | None
    factory: Factory


_REGISTRY: dict[tuple[str, str], list[_Entry]] = {}


def register(
    op_type: str | Sequence[str],
    domain: str = ONNX_DOMAIN,
    since: int = 1,
    until: int | None = None,
) -> Callable[[Factory], Factory]:
    """Register a kernel factory for op_type(s) in domain, for opsets since..until (inclusive)."""
    names = [op_type] if isinstance(op_type, str) else list(op_type)

    def decorate(factory: Factory) -> Factory:
        for name in names:
            _REGISTRY.setdefault((normalize_domain(domain), name), []).append(
                _Entry(since, until, factory)
            )
        return factory

    return decorate


def lookup(domain: str, op_type: str, opset: int) -> Factory | None:
    """The native factory for this op at this opset, or None (the caller falls back)."""
    _ensure_ops_loaded()
    best: _Entry | None = None
    for entry in _REGISTRY.get((normalize_domain(domain), op_type), []):
        if entry.since <= opset and (entry.until is None or opset <= entry.until):
            if best is None or entry.since > best.since:
                best = entry
    return best.factory if best else None


def registered_ops() -> list[tuple[str, str]]:
    """(domain, op_type) of every natively implemented op."""
    _ensure_ops_loaded()
    return sorted(_REGISTRY)


_loaded = False


def _ensure_ops_loaded() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        from qlinear.runtime import ops  # noqa: F401  (registers every op module)
