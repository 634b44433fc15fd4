"""Runs of plan steps that execute as one native call (`kernels.program`).

A *chain* is a run of two or more consecutive steps whose kernels declare themselves
replayable (``kernel.replayable = True``: every call only launches `run_tasks` kernels
on arrays that stay valid, such as the NHWC QLinearConv with constant parameters,
QLinearAdd, NhwcMaxPool). The session plans it as one step. Per input signature (shapes,
dtypes, kernel family) the first call runs the steps normally while recording their
kernel calls, builds a `NativeProgram`, and checks it: the program and the normal steps
run on a second, different set of inputs and every output byte must match, otherwise
that signature keeps running the steps normally. Later calls replay the program: no
Python between the kernels.

Values inside a chain are not produced by the plan (like a step fusion's); a run that
asks for one uses the session's plan without fusions.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from qlinear.runtime.kernels import config, parallel
from qlinear.runtime.kernels.program import NativeProgram

#: Input dtypes a chain can be checked with (random values of any bit pattern are valid).
_CHECKABLE = (np.dtype(np.uint8), np.dtype(np.int8), np.dtype(np.float32))

#: Input signatures a chain keeps programs for (each holds its intermediate buffers).
_MAX_SIGNATURES = 8


def replayable(kernel: Callable[..., Any]) -> bool:
    return bool(getattr(kernel, "replayable", False))


class Chain:
    """The kernel of a chain step: `chain(*inputs) -> tuple of outputs`.

    `run_steps(steps, env, keep)` runs plan steps normally (the session's loop, so errors
    name their node)."""

    def __init__(
        self,
        steps: Sequence[Any],
        inputs: tuple[str, ...],
        outputs: tuple[str, ...],
        consts: dict[str, np.ndarray],
        run_steps: Callable[[Sequence[Any], dict, set], None],
    ) -> None:
        self.steps = list(steps)
        self.inputs = inputs
        self.outputs = outputs
        self._consts = consts
        self._run_steps = run_steps
        self._keep = set(outputs)
        self._programs: dict[tuple, NativeProgram | None] = {}
        self._n_in = len(inputs)
        self._lock = threading.Lock()
        #: why the last program of a signature was not kept (tests, debugging)
        self.rejected: dict[tuple, str] = {}

    def __call__(self, *xs: np.ndarray) -> tuple[np.ndarray, ...]:
        key = (*((x.shape, x.dtype) for x in xs), config.kernel_choice())
        program = self._programs.get(key, False)
        if program and self._lock.acquire(blocking=False):
            try:
                if all(x.flags.c_contiguous for x in xs):
                    outs = tuple(np.empty(shape, dtype)
                                 for shape, dtype in program.externals[self._n_in:])
                    views = tuple(a.reshape(-1).view(np.uint8) for a in (*xs, *outs))
                    if program.run(views):
                        return outs
            finally:
                self._lock.release()
        elif program is False and self._lock.acquire(blocking=False):
            try:
                return self._record(key, xs)
            finally:
                self._lock.release()
        return self._python(xs)

    def _python(self, xs: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
        env = dict(self._consts)
        env.update(zip(self.inputs, xs, strict=True))
        self._run_steps(self.steps, env, self._keep)
        return tuple(env[name] for name in self.outputs)

    def _record(self, key: tuple, xs: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
        with parallel.record_calls() as rec:
            outs = self._python(xs)
        if not rec.active:  # another thread was recording: try again on a later call
            return outs
        if len(self._programs) >= _MAX_SIGNATURES:
            self._programs.clear()
        self._programs[key] = None
        reason = self._unbuildable(rec, xs, outs)
        if reason is None:
            try:
                program = NativeProgram(rec.calls, [*xs, *outs])
            except (ValueError, TypeError) as exc:  # e.g. an argument numba cannot store
                reason = f"cannot build: {exc}"
            else:
                reason = self._check(program, xs)
                if reason is None:
                    self._programs[key] = program
        if reason is not None:
            self.rejected[key] = reason
        return outs

    def _unbuildable(self, rec: parallel.Recording, xs: Sequence[np.ndarray],
                     outs: Sequence[np.ndarray]) -> str | None:
        if not rec.complete:
            return "a step ran native work outside run_tasks"
        if not rec.calls:
            return "no kernel calls"
        arrays = [*xs, *outs]
        if not all(isinstance(a, np.ndarray) and a.flags.c_contiguous for a in arrays):
            return "an input or output is not a C-contiguous array"
        if any(x.dtype not in _CHECKABLE for x in xs):
            return "an input dtype the check cannot draw"
        return None

    def _check(self, program: NativeProgram, xs: Sequence[np.ndarray]) -> str | None:
        """Replay on other inputs and compare with the steps run normally."""
        rng = np.random.default_rng(len(self.steps))
        others = tuple(_other_values(x, rng) for x in xs)
        expected = self._python(others)
        outs = tuple(np.full(shape, 0xA5, np.uint8).view(dtype) if np.dtype(dtype).itemsize == 1
                     else np.full(shape, np.nan, dtype) if np.dtype(dtype).kind == "f"
                     else np.full(shape, -12345, dtype)
                     for shape, dtype in program.externals[self._n_in:])
        if not program.run(tuple(a.reshape(-1).view(np.uint8) for a in (*others, *outs))):
            return "the replay raised"
        for name, got, want in zip(self.outputs, outs, expected, strict=True):
            if got.tobytes() != want.tobytes():
                return f"replayed output {name!r} differs from the steps' result"
        return None


def _other_values(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if x.dtype.kind == "f":
        return rng.standard_normal(x.shape).astype(x.dtype)
    info = np.iinfo(x.dtype)
    return rng.integers(info.min, info.max, x.shape, dtype=x.dtype, endpoint=True)


def plan_chains(steps: list, keep_after: set[str], consts: dict[str, np.ndarray],
                run_steps: Callable[[Sequence[Any], dict, set], None],
                make_step: Callable[[Chain, Any], Any]) -> tuple[list, set[str]]:
    """The plan with each chain as one step, and the values the chains hide.

    keep_after: names that must stay fetchable besides those later steps read (the graph
    outputs). make_step(chain, first_inner_step) builds the session's step object."""
    planned: list = []
    hidden: set[str] = set()
    i = 0
    while i < len(steps):
        j = i
        while j < len(steps) and replayable(steps[j].kernel):
            j += 1
        if j - i < 2:
            planned.extend(steps[i : max(j, i + 1)])
            i = max(j, i + 1)
            continue
        inner = steps[i:j]
        produced = {o for s in inner for o in s.outputs if o}
        read_later = {n for s in steps[j:] for n in s.inputs if n}
        outputs = tuple(o for s in inner for o in s.outputs
                        if o and (o in read_later or o in keep_after))
        inputs: list[str] = []
        for s in inner:
            for n in s.inputs:
                if n and n not in produced and n not in consts and n not in inputs:
                    inputs.append(n)
        if not outputs:
            planned.extend(inner)
        else:
            chain = Chain(inner, tuple(inputs), outputs, consts, run_steps)
            planned.append(make_step(chain, inner[0]))
            hidden |= produced - set(outputs)
        i = j
    return planned, hidden
