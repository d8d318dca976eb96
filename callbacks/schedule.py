"""How the calibration passes run: the hooked forward (PruneCallback's own, when it cannot reuse the probe's), the
inputs captured off the probe's forward (when it can), the compile stance they run in, and each sample's sink scores
averaged over the timesteps (s̄, the reference's SparseGPT), collected in the calibration epoch for the passes from
cached block inputs (callbacks/cached.py)."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

from callbacks.reduction import gather_records
from pipeline.maths.attention import force_eager
from pipeline.model.calibration import NoisedBatch, forward_through_blocks
from pipeline.run.protocols import GuardsMemory


class MeanSinkScores:
    """sample id -> [Σ_t term(s_t) (float32 [L]), number of timesteps], summed in the timesteps' order (as the
    reference).  term and the mean are the pruner's (`score_term`, `mean_score`): s and Σ/n for the reference."""

    def __init__(self, pruner):
        self.sums: dict[int, list] = {}
        self.pruner = pruner  # (kept, not its methods: the callback must pickle for DDP spawn)

    def term(self, scores: torch.Tensor) -> torch.Tensor:
        return self.pruner.score_term(scores)

    def mean(self, total: torch.Tensor, count: int) -> torch.Tensor:
        return self.pruner.mean_score(total, count)

    def add(self, nb: NoisedBatch, seen: set, method: str) -> None:
        if nb.sink_scores is None:
            raise RuntimeError(f"prune method={method}: no sink scores on the batch; list SinkStatsCallback before PruneCallback")
        for b, sid in enumerate(nb.sample_ids):
            if sid < 0 or (0, sid, nb.step) in seen:
                continue
            scores = self.term(nb.sink_scores[b].detach().float().cpu())
            if sid in self.sums:
                self.sums[sid][0] = self.sums[sid][0] + scores
                self.sums[sid][1] += 1
            else:
                self.sums[sid] = [scores, 1]
            seen.add((0, sid, nb.step))

    def gather(self) -> None:
        """Every rank gets every sample's s̄ (collective)."""
        self.sums = {int(k): v for k, v in gather_records(self.sums).items()}

    def with_mean(self, nb: NoisedBatch, flavor: str) -> NoisedBatch:
        """The batch carrying each sample's s̄ as its sink scores (zeros for DDP padding)."""
        missing = [sid for sid in nb.sample_ids if sid >= 0 and sid not in self.sums]
        if missing:
            raise RuntimeError(f"prune flavor={flavor}: no mean sink scores for samples {missing[:4]}; "
                               "the calibration epoch must see every calibration sample")
        length = nb.input_ids.shape[1]
        scores = torch.stack([self.mean(*self.sums[sid]) if sid >= 0 else torch.zeros(length) for sid in nb.sample_ids])
        return NoisedBatch(nb.input_ids, nb.clean_ids, nb.masked, nb.t, nb.step, nb.sample_ids, nb.attention_mask,
                           sink_scores=scores.to(nb.input_ids.device))


def guard_memory(pl_module):
    """The module's out-of-memory guard (DLMModule: one line with the plan and the fix), else nothing."""
    return pl_module.out_of_memory_guard() if isinstance(pl_module, GuardsMemory) else nullcontext()


@contextmanager
def eager_stance(on: bool):
    """torch.compile's "force_eager" stance while inside (when `on`): a compiled SDPA runs its Python, no compile."""
    stance = force_eager() if on else None
    try:
        yield
    finally:
        if stance is not None:
            stance.__exit__(None, None, None)


def hooked_forward(pl_module, layers: dict, names: list[str], on_input, input_ids, attention_mask, stop_after,
                   eager: bool) -> None:
    """One calibration forward up to `stop_after` with on_input(name, x) called on every named layer's input."""
    handles = [layers[n].register_forward_hook(lambda mod, inp, out, n=n: on_input(n, inp[0].detach())) for n in names]
    try:
        with eager_stance(eager):
            forward_through_blocks(pl_module, input_ids, attention_mask, stop_after=stop_after)
    finally:
        for h in handles:
            h.remove()


class ProbedInputs:
    """The targeted layers' inputs captured during SinkStatsCallback's probed forward (single pass: no second
    forward, bit-identical to one), each with its MoE routing (`routed(name)`, None for dense layers)."""

    def __init__(self):
        self.captured: dict[str, tuple] = {}
        self.handles: list = []
        self.reads_last_block = False  # a captured layer sits in the model's last block (the probe must not stop early)

    def start(self, layers: dict, names: list[str], routed, last_block_name: str) -> None:
        self.captured = {}
        self.handles = [layers[n].register_forward_hook(
            lambda mod, inp, out, n=n: self.captured.__setitem__(n, (inp[0].detach(), routed(n)))) for n in names]
        self.reads_last_block = any(n.startswith(f"{last_block_name}.") for n in names)

    def take(self, names: list[str]) -> list[tuple]:
        """[(name, x, routed)] of `names` in the order they ran (an expert that no token reached did not run)."""
        captured, self.captured, names = self.captured, {}, set(names)
        return [(n, *captured[n]) for n in captured if n in names]

    def stop(self) -> None:
        for h in self.handles:
            h.remove()
        self.captured, self.handles, self.reads_last_block = {}, [], False
