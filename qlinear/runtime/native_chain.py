"""Runs of plan steps that execute as one native call (`kernels.program`).

A *chain* is a run of two or more consecutive steps whose kernels declare themselves
replayable (``kernel.replayable = True``: every call only launches `run_tasks` kernels
on arrays that stay valid, such as the NHWC QLinearConv with constant parameters,
QLinearAdd, NhwcMaxPool). The session plans it as one step whose kernel runs the steps
through `program.Replayed`: per input signature the first call records their kernel
calls and checks the program on other inputs; later calls replay it, with no Python
between the kernels.

Values inside a chain are not produced by the plan (like a step fusion's); a run that
asks for one uses the session's plan without fusions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from qlinear.runtime.kernels.program import Replayed


def replayable(kernel: Callable[..., Any]) -> bool:
    return bool(getattr(kernel, "replayable", False))


class Chain:
    """The kernel of a chain step: `chain(*inputs) -> tuple of outputs`, replayed natively
    (`program.Replayed`) after its first run.

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
        self.replayed = Replayed(self._python, outputs)

    def __call__(self, *xs: np.ndarray) -> tuple[np.ndarray, ...]:
        return self.replayed(*xs)

    def _python(self, *xs: np.ndarray) -> tuple[np.ndarray, ...]:
        env = dict(self._consts)
        env.update(zip(self.inputs, xs, strict=True))
        self._run_steps(self.steps, env, self._keep)
        return tuple(env[name] for name in self.outputs)


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
