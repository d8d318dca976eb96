"""Layers fed one tensor share one statistic.

LLaDA's q/k/v projections read the same hidden states, as do a gated MLP's gate and up projections: their Wanda norms
and Hessians are the same numbers, so PruneCallback computes them once (on the group's *leader*) and every member reads
the leader's total (`SlotSums.take_each`).  One GEMM and one set of reduction slots instead of three, the same bits.
"""
from __future__ import annotations

import torch

from callbacks.schedule import hooked_forward
from pipeline.model.calibration import mask_window


class SharedInputs:
    """Targeted Linears that the model feeds the very same input tensor (LLaDA's q/k/v projections, a gated MLP's
    gate/up): the statistic is computed once, on the group's first layer to run (its *leader*), and the others read
    the leader's total.  Bit-identical to computing each: the same input through the same operations.

    The groups come from one short dense forward (`find`), where every input is held, so two layers share a group
    only if their inputs are the same memory at the same time; a layer that runs more than once per forward is
    never grouped.  In calibration each member's input is checked against its leader's (held until the next)."""

    def __init__(self, members: dict[str, str] | None = None):
        self.members = members or {}             # member -> leader
        self.leaders = set(self.members.values())
        self.held: dict[str, torch.Tensor] = {}  # leader -> its latest input

    @classmethod
    def find(cls, pl_module, layers: dict[str, torch.nn.Linear], stop_after: torch.nn.Module, eager: bool) -> "SharedInputs":
        """From one forward of 8 mask tokens through `stop_after` (the last targeted block)."""
        inputs: dict[str, list[torch.Tensor]] = {}
        ids = mask_window(pl_module)
        with torch.no_grad():
            hooked_forward(pl_module, layers, list(layers), lambda n, x: inputs.setdefault(n, []).append(x), ids, None,
                           stop_after, eager)
        members, first_of = {}, {}
        for name, xs in inputs.items():  # in the order the layers ran
            if len(xs) == 1:
                leader = first_of.setdefault(_memory(xs[0]), name)
                if leader != name:
                    members[name] = leader
        return cls(members)

    def key(self, name: str) -> str:
        """The name under which `name`'s statistic is summed."""
        return self.members.get(name, name)

    def is_copy(self, name: str, x: torch.Tensor) -> bool:
        """True when `name` is a member (its statistic is its leader's); notes a leader's input."""
        leader = self.members.get(name)
        if leader is None:
            if name in self.leaders:
                self.held[name] = x
            return False
        held = self.held.get(leader)
        if held is None or _memory(held) != _memory(x):
            raise RuntimeError(f"prune: {name} took a different input than {leader} in this forward, unlike in the "
                               "short forward at the start of the run; the model's forward is not deterministic in structure")
        return True

    def release(self) -> None:
        self.held.clear()


def _memory(x: torch.Tensor) -> tuple:
    return (x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), x.stride(), x.dtype, x.device)
