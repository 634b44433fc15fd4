"""The runtime: a Session that plans a graph once and runs it with native kernels."""

from qlinear.runtime.session import NodeExecutionError, NodeTime, Session, TensorInfo

__all__ = ["NodeExecutionError", "NodeTime", "Session", "TensorInfo"]
