"""SinkStatsCallback: attention mass per token at every calibration timestep, and the sink scores.

For each noised batch (see pipeline/model/calibration.py) it runs one probed forward, sums the attention
probability each key receives over queries, heads and layers, and publishes
    nb.sink_scores = sigmoid(alpha · (mass − (mean + k·std)))      (per sample, over positions)
for PruneCallback to down-weight sink tokens.  During the first epoch it also records per-(sample,
timestep) diagnostics; at the epoch's end it gathers them across ranks and rank 0 writes
`sinks.json` (per-timestep table, sink-position variance across timesteps) and `sink_heatmap.png`.
The run's flavour (pipeline/maths/flavors.py; "reference-exact": the reference's own operations, its bits) picks
the operations of the mass and the scores.
On a CUDA device with triton installed, each attention call's mass comes from a fused Triton kernel
(mass_kernel="auto"; "chunked" keeps the float32 chunks; the reference's operations take no kernel).
With an offloaded model (DLMModule(offload=...)) no forward runs per batch: the noised batches are recorded, and at
the epoch's end one block-by-block pass over all of them gives every window's mass over all layers (the same bits),
then the scores (`scores_for(nb)`, read by PruneCallback) and the records.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from rich.console import Console

from pipeline.model.calibration import (NoisedBatch, calibration_forward, find_blocks, forward_through_blocks, last_block,
                                        mask_window)
from callbacks.cached import RecordedBatches, mass_from_cache, uniform_block_calls
from callbacks.reduction import gather_records
from callbacks.schedule import guard_memory
from pipeline.run.phase import phase
from pipeline.maths.attention import MASS_KERNELS, AttentionMassProbe
from pipeline.run.outputs import AtomicDir
from pipeline.run.protocols import (ChecksContracts, KnowsBlockCalls, NoisedBatchHooks, SinkScoreConsumer, callbacks_of, check_module,
                                    module_offloader, run_flavor)
from pipeline.evaluation.sink_tables import plot_heatmap, render_timestep_table, positional_warning, summarize_records
from pipeline.maths.flavors import DEFAULT
from pipeline.maths.sinks import mass_statistics, token_kind


class SinkStatsCallback(Callback, NoisedBatchHooks, ChecksContracts):
    def __init__(
        self,
        sink_std: float = 2.0,
        sink_alpha: float = 5.0,
        per_layer: bool = False,
        chunk_size: int = 128,
        output_dir: str | None = None,
        heatmap: bool = True,
        record: bool = True,
        overwrite: bool = False,
        mass_kernel: str = "auto",
    ):
        for name, value in (("sink_std", sink_std), ("sink_alpha", sink_alpha)):
            if not math.isfinite(value):
                raise ValueError(f"SinkStatsCallback.{name}={value} is not finite; use a finite number (defaults: sink_std 2.0, sink_alpha 5.0)")
            if value <= 0:
                raise ValueError(f"SinkStatsCallback.{name}={value} must be > 0 (a sink lies sink_std standard deviations "
                                 "above the mean mass; defaults: sink_std 2.0, sink_alpha 5.0)")
        if chunk_size < 1:
            raise ValueError(f"SinkStatsCallback.chunk_size={chunk_size} must be >= 1 (queries per softmax chunk; default 128)")
        if mass_kernel not in MASS_KERNELS:
            raise ValueError(f"SinkStatsCallback.mass_kernel={mass_kernel!r} is not one of {MASS_KERNELS} "
                             "(auto: the Triton kernel on CUDA, else chunked; default auto)")
        self.mass_kernel = mass_kernel
        self.overwrite = overwrite
        self.sink_std, self.sink_alpha = float(sink_std), float(sink_alpha)
        self.per_layer, self.chunk_size = per_layer, chunk_size
        self.output_dir, self.heatmap, self.record = output_dir, heatmap, record
        self.records: dict[tuple[int, int], dict] = {}
        self.summary: dict | None = None
        self._stop_after: torch.nn.Module | None = None
        self._last_call: int | None = None
        self._calls_checked = False
        self._flavor = DEFAULT
        self.deferred = RecordedBatches()  # offloaded model: the noised batches whose mass waits for the epoch's end
        self.offload_scores: dict[tuple, torch.Tensor] = {}

    def setup(self, trainer, pl_module, stage=None) -> None:
        self.check_contracts(trainer, pl_module)

    def check_contracts(self, trainer, pl_module) -> None:
        check_module(pl_module, "SinkStatsCallback")

    def on_fit_start(self, trainer, pl_module) -> None:
        """Fail in seconds, not after the dense scoring, when the probe cannot see the model's attention."""
        ids = mask_window(pl_module)
        with torch.no_grad(), AttentionMassProbe(chunk_size=self.chunk_size) as probe:
            calibration_forward(pl_module, ids)
        probe.require_attention(pl_module.model)
        self._stop_after = last_block(pl_module.model)  # the probed forwards need no LM head
        # one attention call per block: a forward wanted for its mass alone may stop at the last one, once the first
        # whole forward of a calibration window has made that many calls too (on_noised_batch_start)
        self._last_call = probe.calls if probe.calls == len(find_blocks(pl_module.model)) else None
        self._calls_checked = False
        self._flavor = run_flavor(trainer)

    # --- per noised batch --------------------------------------------------------------------------
    def on_noised_batch_start(self, trainer, pl_module, nb: NoisedBatch) -> None:
        consumers = callbacks_of(trainer, SinkScoreConsumer)
        if consumers and not any(cb.wants_sink_scores(trainer.current_epoch) for cb in consumers):
            return  # e.g. flavor="reference" SparseGPT's clean-input block epochs
        if module_offloader(pl_module) is not None:
            return self.deferred.record(nb, clean=False)
        valid = nb.attention_mask.bool() if nb.attention_mask is not None else None
        read = any(cb.reads_probed_forward(trainer.current_epoch) for cb in consumers)
        last_call = None if read or not self._calls_checked else self._last_call  # None: the whole forward
        kernel = "auto" if self._flavor.reference_mass else self.mass_kernel  # the reference's order takes no kernel
        with AttentionMassProbe(per_layer=self.per_layer, chunk_size=self.chunk_size, query_weights=valid,
                                last_call=last_call, reference_order=self._flavor.reference_mass, kernel=kernel) as probe:
            forward_through_blocks(pl_module, nb.input_ids, nb.attention_mask, stop_after=self._stop_after)
        probe.require_attention()
        if not self._calls_checked:  # the first whole forward of a window: the same number of calls as at fit start?
            self._last_call = self._last_call if probe.calls == self._last_call else None
            self._calls_checked = True
        self._publish(trainer, pl_module, nb, probe.mass, probe.per_layer)

    def _publish(self, trainer, pl_module, nb: NoisedBatch, mass, per_layer) -> None:
        """nb.sink_scores from the mass over all layers; the epoch-0 records."""
        valid = nb.attention_mask.bool() if nb.attention_mask is not None else None
        if not torch.isfinite(mass).all():
            where = _locate_nonfinite_attention(pl_module, nb, valid, self.chunk_size)
            raise FloatingPointError(
                f"attention mass has NaN/Inf at timestep t={nb.t} (samples {nb.sample_ids}){where}; "
                "check the model's dtype and inputs"
            )
        nb.sink_scores = self._flavor.sink_scores(mass, self.sink_std, self.sink_alpha, valid)
        nb.extras["attention_mass"] = mass
        if self.per_layer:
            nb.extras["attention_mass_per_layer"] = per_layer
        if self.record and trainer.current_epoch == 0:
            self._record(pl_module, nb, mass, per_layer if self.per_layer else None, valid)

    def _mass_block_by_block(self, trainer, pl_module) -> None:
        """Offloaded model: every recorded batch's mass in one block-by-block pass, then its scores and records."""
        batches = self.deferred.noised_batches(pl_module.device)
        self.deferred, self.offload_scores = RecordedBatches(), {}
        uniform = next((cb.blocks_called_alike() for cb in callbacks_of(trainer, KnowsBlockCalls)), None)  # PruneCallback's
        uniform = uniform_block_calls(pl_module) if uniform is None else uniform
        masses = mass_from_cache(pl_module, batches, pl_module.offloader, True, uniform, chunk_size=self.chunk_size,
                                 reference_order=self._flavor.reference_mass,
                                 kernel="auto" if self._flavor.reference_mass else self.mass_kernel)  # (as the resident probe)
        for nb, (mass, per_call) in zip(batches, masses):
            if mass is None:
                from pipeline.maths.attention import NoAttentionSeenError
                raise NoAttentionSeenError("the model made no attention call the probe could see in its blocks; use "
                                           "attn_implementation='sdpa'")
            nb.t = pl_module.timesteps[nb.step]
            self._publish(trainer, pl_module, nb, mass, per_call)
            self.offload_scores[(nb.step, tuple(nb.sample_ids))] = nb.sink_scores.cpu()

    def scores_for(self, nb: NoisedBatch) -> torch.Tensor:
        """The sink scores the block-by-block pass gave the batch with nb's samples and step (offloaded model)."""
        return self.offload_scores[(nb.step, tuple(nb.sample_ids))]

    def _record(self, pl_module, nb, mass, per_layer, valid):
        stats = mass_statistics(mass, valid=valid)
        dominant = stats["dominant_position"]
        # what the records read, moved to host memory once per batch (not one synchronisation per sample and field)
        host = {"mass": mass.float(), "dominant": dominant, "token": nb.input_ids.gather(1, dominant[:, None])[:, 0],
                "top1": stats["top1_share"], "entropy": stats["normalized_entropy"],
                "n_sinks": (nb.sink_scores > 0.5).sum(dim=1), "valid": valid,
                "any_valid": None if valid is None else valid.any(dim=1),
                "layer_dominant": None if per_layer is None else torch.stack([m.argmax(dim=1) for m in per_layer], dim=1)}
        host = {k: None if v is None else v.cpu() for k, v in host.items()}
        tokenizer = getattr(pl_module, "tokenizer", None)
        for b, sample_id in enumerate(nb.sample_ids):
            if sample_id < 0:  # DDP padding
                continue
            if valid is not None and not host["any_valid"][b]:
                continue  # all padding: no token, no attention to describe (and no weight in any statistic)
            rec = {
                "t": nb.t,
                "mass": host["mass"][b].clone(),  # (its own storage: a checkpoint saves the row, not the batch)
                "valid": None if valid is None else host["valid"][b].clone(),
                "dominant_position": int(host["dominant"][b]),
                "top1_share": float(host["top1"][b]),
                "entropy": float(host["entropy"][b]),
                "dominant_kind": token_kind(int(host["token"][b]), tokenizer, pl_module.mask_token_id),
                "n_sinks": int(host["n_sinks"][b]),
            }
            if per_layer is not None:
                rec["layer_dominant"] = host["layer_dominant"][b].tolist()
            self.records[(sample_id, nb.step)] = rec

    # --- end of the calibration epoch ----------------------------------------------------------------
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.deferred.batches:
            with guard_memory(pl_module), phase("measuring attention mass block by block"):
                self._mass_block_by_block(trainer, pl_module)
        if not self.record or trainer.current_epoch != 0:
            return
        records = gather_records(self.records)
        if not records:
            return
        self.summary = summarize_records(records)
        if trainer.is_global_zero:
            with AtomicDir(self.output_path(trainer), overwrite=self.overwrite) as tmp:
                (tmp / "sinks.json").write_text(json.dumps(self.summary, indent=1))
                if self.heatmap:
                    heat = torch.tensor([[math.nan if v is None else v for v in row] for row in self.summary["mean_mass_by_timestep"]])
                    labels = [f"t={row['t']:.2f}" for row in self.summary["timesteps"]]
                    plot_heatmap(heat, tmp / "sink_heatmap.png", title="attention mass (mean over samples)", ylabels=labels)
            Console().print(render_timestep_table(self.summary))
            if self.summary["positional_sink"] and self._sink_aware_consumer(trainer):
                Console(stderr=True).print(positional_warning(self.summary["positional_sink"]), style="yellow")

    @staticmethod
    def _sink_aware_consumer(trainer) -> bool:
        """Whether a callback weights by the sink scores (sink_* pruning, sink-aware GPTQ): only then does the
        positional-sink warning (sink-aware pruning acts like the AR recipe) apply."""
        return any(cb.weights_by_sink_scores() for cb in callbacks_of(trainer, SinkScoreConsumer))

    def output_path(self, trainer) -> Path:
        return Path(self.output_dir or Path(trainer.default_root_dir) / "sinks").expanduser()

    def state_dict(self) -> dict:
        return {"records": self.records, "summary": self.summary, "deferred": self.deferred.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.records = state_dict.get("records", {})
        self.summary = state_dict.get("summary")
        self.deferred.load_state_dict(state_dict.get("deferred", {}))


class _LocatingProbe(AttentionMassProbe):
    """Also notes, for every attention call, the innermost module running at that moment."""

    def __init__(self, stack: list[str], **kwargs):
        super().__init__(per_layer=True, **kwargs)
        self.stack, self.modules = stack, []

    def _record(self, *args, **kwargs):
        super()._record(*args, **kwargs)
        self.modules.append(self.stack[-1] if self.stack else "?")


def _locate_nonfinite_attention(pl_module, nb: NoisedBatch, valid, chunk_size: int) -> str:
    """Error path only: re-run the probed forward per attention call and name the first module whose
    attention mass is NaN/Inf (its queries or keys already are), e.g. ", first in attention call 3 of 6
    (bert.encoder.layer.3.attention.self)"; "" if the re-run finds nothing."""
    stack: list[str] = []

    def leave(module, args, output) -> None:  # returns None: the module's output is left as it is
        stack.pop()

    handles = []
    for name, module in pl_module.model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda mod, args, name=name: stack.append(name)))
        handles.append(module.register_forward_hook(leave))
    try:
        with torch.no_grad(), _LocatingProbe(stack, chunk_size=chunk_size, query_weights=valid) as probe:
            calibration_forward(pl_module, nb.input_ids, nb.attention_mask)
    except Exception:  # noqa: BLE001 - a diagnostic must not replace the error it explains
        return ""
    finally:
        for h in handles:
            h.remove()
    for i, layer_mass in enumerate(probe.per_layer):
        if not torch.isfinite(layer_mass).all():
            return f", first in attention call {i} of {probe.calls} ({probe.modules[i] or 'the model itself'})"
    return ""
