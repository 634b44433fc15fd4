"""Errors a user can act on: each names the model part (node, tensor, input) at fault."""

from __future__ import annotations


class QlinearError(Exception):
    """Base of every error qlinear raises on purpose."""


class ModelLoadError(QlinearError):
    """The model file or bytes are not a loadable ONNX model."""


class ExternalDataError(ModelLoadError):
    """External data is missing or points outside the model's folder."""


class UnsupportedOpError(QlinearError):
    """No native implementation and no onnx.reference implementation for a node."""


class InvalidModelError(QlinearError):
    """The graph is malformed (dangling inputs, cycles, bad attributes)."""


class InputError(QlinearError, ValueError):
    """A feed has an unknown name, is missing, or has the wrong dtype or shape."""


class QuantParamsError(QlinearError, ValueError):
    """Quantization parameters that are inconsistent with the tensor they describe."""
