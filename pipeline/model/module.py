"""DLMModule: a LightningModule around a Hugging Face diffusion LM, for calibration without training.

`fit` runs calibration epochs: no optimizer, no gradient.  Each training step noises the batch at every
timestep of the schedule and hands each noised batch to the callbacks (see pipeline/model/calibration.py).
`score_heldout` gives held-out masked-diffusion perplexity; EvaluateExportCallback calls it (dense and pruned).
"""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager, nullcontext

import lightning as L
import torch
from typing_extensions import override

from pipeline.model.calibration import (calibration_forward, dispatch_noised_batch, find_blocks, noised_batches,
                                        reference_noised_batches)
from pipeline.model.head import logits_at
from pipeline.maths.diffusion import DEFAULT_EPS, NOISES, check_window, timestep_grid
from pipeline.model.loading import check_mask_id, dlm_forward, load_dlm, resolve_mask_token_id, resolve_path
from pipeline.model import memory_plan as mp
from pipeline.model.offload import OFFLOADS, BlockOffloader
from pipeline.run.phase import current, set_current
from pipeline.run.protocols import SizesCalibrationMemory, WritesCheckpoints, callbacks_of, run_flavor
from pipeline.maths.metrics import MaskedDiffusionPerplexity, elbo_nll


DTYPES = ("auto", "float32", "float16", "bfloat16", "float64")
FIT_HINT = ("every rank holds a whole copy of the model; use model.init_args.torch_dtype: bfloat16, "
            "PruneCallback mode: sequential with a smaller data.init_args.batch_size, or a GPU with more memory "
            "(README 'Scaling out')")


def check_fits(model: torch.nn.Module, device: torch.device, name: str, headroom: float = 1.1) -> None:
    """Fail before Lightning moves the weights, with the numbers, instead of a CUDA OOM traceback later."""
    if device.type != "cuda":
        return
    needed = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()) if t.device.type != "cuda")
    free, total = torch.cuda.mem_get_info(device)
    if needed * headroom > free:
        raise RuntimeError(f"{name} needs {needed / 2**30:.1f} GiB for its weights but {device} has {free / 2**30:.1f} GiB "
                           f"free of {total / 2**30:.1f} GiB: {FIT_HINT}")


class DLMModule(L.LightningModule):
    def __init__(
        self,
        pretrained: str = "minilm-dlm",
        mask_token_id: int | None = None,
        trust_remote_code: bool = True,
        torch_dtype: str | None = None,
        model_class: str = "auto",
        timesteps: int | list[float] = 10,
        eps: float = DEFAULT_EPS,
        seed: int = 0,
        heldout_timesteps: int = 8,
        attn_implementation: str | None = "sdpa",
        keep_special_tokens: bool = False,
        noise: str = "mask",
        offload: str = "auto",
    ):
        """Args:
            keep_special_tokens: never mask the special token the data puts first (BOS / [CLS]), in
                calibration and in held-out scoring, for models trained that way (minilm-dlm, tiny-llada).
                The default masks every position, like the reference and LLaDA's pretraining.
            noise: "mask" (a noised position becomes the mask token: LLaDA, Dream, SDAR) or "uniform" (it becomes
                a uniformly random vocabulary token: DiffusionGemma-style random-token noise), in calibration
                and in held-out scoring.
            offload: where the transformer blocks' weights live during calibration (docs/offload.md): "auto" (default:
                on the device when the memory plan says the model and the calibration state fit its free memory, else
                "cpu"), "none" (on the device), "cpu" (CPU memory, onloaded block by block) or "disk" (memory-mapped
                from the checkpoint's safetensors, onloaded block by block).  SINKPRUNE_DEVICE_BUDGET (e.g. 20GiB)
                replaces the device's free memory in the plan.

        The order of the noise follows the run's flavour (PruneCallback's `flavor`, pipeline/maths/flavors.py):
        each (sample, timestep) from its own hashed seed, identical across DDP world sizes and batch sizes, or, for
        "reference-exact", the reference's order (one generator seeded once per epoch, one draw per (batch,
        timestep) in window order; mask noise only).
        """
        super().__init__()
        self.save_hyperparameters()
        self.timesteps = validate_timesteps(timesteps)
        self._noise_generator: torch.Generator | None = None
        self.noise_order = "per_sample"  # the run's flavour's (setup)
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"model.eps={eps} must be in [0, 1); the default is 1e-3")
        if torch_dtype is not None and str(torch_dtype) not in DTYPES:
            raise ValueError(f"model.torch_dtype={torch_dtype!r} is not a dtype; use one of {', '.join(DTYPES)}")
        if heldout_timesteps < 1:
            raise ValueError(f"model.heldout_timesteps={heldout_timesteps} must be >= 1 (timesteps per held-out window)")
        if noise not in NOISES:
            raise ValueError(f"model.noise={noise!r}: use one of {', '.join(NOISES)}")
        if offload not in OFFLOADS:
            raise ValueError(f"model.offload={offload!r}: use one of {', '.join(OFFLOADS)} (default auto)")
        device_budget()  # a malformed SINKPRUNE_DEVICE_BUDGET fails here, before loading
        resolve_path(pretrained)  # a missing local path fails here, before anything is loaded
        self.offloader: BlockOffloader | None = None  # set in configure_model when the plan offloads
        self.memory_plan: dict | None = None
        self.model = None  # loaded in configure_model, after every config check has passed
        self.tokenizer = None
        self.mask_token_id: int | None = None
        self.heldout_windows: dict = {}  # window index -> (nll, tokens) of the last score_heldout
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints carry no weights (see on_save_checkpoint)

    @override
    def on_save_checkpoint(self, checkpoint):
        # Calibration never changes the weights a reload cannot rebuild: the pretrained ones come from
        # `pretrained`, pruned ones from PruneCallback's state.  An 8B checkpoint stays megabytes, not 16 GB.
        checkpoint["state_dict"] = {}

    @override
    def configure_model(self):
        if self.model is not None:
            return
        hp = self.hparams
        # Lightning runs this hook under `with torch.device(root_device)`: a model that will be offloaded loads into
        # CPU memory instead (a resident one goes straight to the device, as before)
        on_cpu = self._target_device().type != "cpu" and self._offload_before_loading() != "none"
        try:
            with torch.device("cpu") if on_cpu else nullcontext():
                self.model, self.tokenizer = load_dlm(
                    hp.pretrained, trust_remote_code=hp.trust_remote_code, torch_dtype=hp.torch_dtype,
                    model_class=hp.model_class, attn_implementation=hp.attn_implementation,
                )
        except torch.OutOfMemoryError as exc:
            raise RuntimeError(f"{hp.pretrained} does not fit in the memory of {self._target_device()}: {FIT_HINT}") from exc
        self._plan_memory()
        if self.offloader is None:
            check_fits(self.model, self._target_device(), hp.pretrained)
        self.mask_token_id = resolve_mask_token_id(self.tokenizer, self.model.config, hp.mask_token_id)
        check_mask_id(self.mask_token_id, self.model.get_input_embeddings().num_embeddings)
        named = getattr(self.tokenizer, "mask_token_id", None)
        if hp.mask_token_id is not None and named is not None and int(named) != self.mask_token_id:
            warnings.warn(f"model.mask_token_id={self.mask_token_id} differs from the tokenizer's mask token id {named} "
                          f"({self.tokenizer.mask_token!r}); the configured id is used", stacklevel=2)
        self.model.requires_grad_(False)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        seqlen = getattr(getattr(dm, "hparams", None), "seqlen", None) if dm is not None else None
        check_window(seqlen, self.model.config)

    def _offload_before_loading(self) -> str:
        """offload, with "auto" resolved by the plan of the checkpoint's config.json (no weights); "cpu" when the
        config does not say enough (loading into CPU memory is always safe)."""
        if self.hparams.offload != "auto":
            return self.hparams.offload
        try:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(resolve_path(self.hparams.pretrained), trust_remote_code=self.hparams.trust_remote_code)
            shape = mp.shape_from_config(config.to_dict(), self.hparams.pretrained)
        except (ValueError, OSError, TypeError, KeyError):
            return "cpu"
        device = self._target_device()
        return mp.memory_plan(shape, self._calibration_sizes(), device_free=device_free_bytes(device),
                              cpu_free=cpu_free_bytes(), devices=self._world_size())["offload"]

    def _plan_memory(self) -> None:
        """The memory plan (printed before any work; results.json `memory`), and the offloader when it offloads."""
        device, blocks = self._target_device(), [b for _, b in find_blocks(self.model)]
        shape = mp.shape_from_model(self.model, blocks, self.hparams.pretrained)
        loaded_there = sum(t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers())
                           if t.device == device) if device.type == "cuda" else 0  # (free again once offloaded)
        offload = self.hparams.offload if blocks else "none"
        if offload == "auto" and device.type == "cpu" and device_budget() is None:
            offload = "none"  # the CPU computes: offloading to its own memory would only add copies
        self.memory_plan = mp.memory_plan(shape, self._calibration_sizes(), device_free=device_free_bytes(device, loaded_there),
                                          cpu_free=cpu_free_bytes(), devices=self._world_size(), offload=offload)
        if self._trainer is None or self.trainer.is_global_zero:
            print(mp.render_plan(self.memory_plan), flush=True)
        if self.memory_plan["offload"] != "none":
            self.offloader = BlockOffloader(self.model, blocks, device, self.memory_plan["offload"],
                                            resolve_path(self.hparams.pretrained))
            self.offloader.park_inputs = self.memory_plan["block_inputs_on"] == "cpu"  # (the plan: where they fit)
            # every rank maps the same checkpoint: the blocks are not broadcast (nor could NCCL send CPU tensors)
            self._ddp_params_and_buffers_to_ignore = [f"model.{n}" for n in self.offloader.ignored_names]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def _world_size(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def _calibration_sizes(self) -> mp.Calibration:
        """The calibration's sizes, read off the data module and the pruning callback (defaults when absent)."""
        cal = mp.Calibration(timesteps=len(self.timesteps))
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        hp = getattr(dm, "hparams", {})
        cal.windows, cal.seqlen, cal.batch_size = (hp.get(k, d) for k, d in
                                                   (("nsamples", cal.windows), ("seqlen", cal.seqlen), ("batch_size", 1)))
        for cb in callbacks_of(self.trainer, SizesCalibrationMemory) if self._trainer is not None else []:
            statistic, slots = cb.calibration_memory()
            cal.statistic, cal.reduction_slots = statistic, slots or cal.reduction_slots
        return cal

    def memory_report(self) -> dict:
        """The plan with the measured peaks beside it (results.json `memory`)."""
        report = dict(self.memory_plan or {})
        device = self._target_device()
        report["measured_device_peak_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        if self.offloader is not None:
            report["offloader"] = self.offloader.report()
        return report

    @contextmanager
    def out_of_memory_guard(self):
        """A CUDA out-of-memory error becomes one line: where, the plan, the measured peak, the fix, the resume."""
        try:
            yield
        except torch.OutOfMemoryError:
            raise RuntimeError(self.out_of_memory_message()) from None  # (the one line cli.py prints is the root cause)

    def out_of_memory_message(self) -> str:
        plan, device = self.memory_plan or {}, self._target_device()
        peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else
                self.offloader.peak_bytes if self.offloader is not None else None)
        offload = plan.get("offload", "none")
        fixes = ["model.offload: cpu (blocks onloaded one at a time)"] if offload == "none" else []
        cal = self._calibration_sizes()
        if cal.batch_size > 1:
            fixes.append(f"data.init_args.batch_size: {cal.batch_size // 2}")
        if cal.statistic == "hessian":
            fixes.append("more devices or fewer PruneCallback reduction_slots (SparseGPT's Hessian slots)")
        fixes.append("PruneCallback mode: sequential" if offload == "none" else "a shorter data.init_args.seqlen")
        checkpoint = next(iter(callbacks_of(self.trainer, WritesCheckpoints)), None)
        last = checkpoint.last_checkpoint(self.trainer) if checkpoint is not None else None
        resume = (f"resume with --ckpt_path {last}" if last is not None and last.is_file() else
                  "add a CalibrationCheckpoint to trainer.callbacks to resume instead of starting over")
        return (f"CUDA out of memory while {current()}: plan offload={offload} predicted a peak of "
                f"{mp.gib(plan.get('predicted_device_peak_bytes'))} of {mp.gib(plan.get('device_free_bytes'))} free, "
                f"measured peak {mp.gib(peak)}; fix: {' or '.join(fixes)}; {resume}")

    def _target_device(self) -> torch.device:
        return self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")

    # --- calibration -------------------------------------------------------------------------------
    @override
    def configure_optimizers(self):
        return None

    @override
    def on_train_start(self):
        # Fit may put modules in train mode; calibration must see the inference network (no dropout).
        # on_train_start also runs when resuming mid-epoch, where on_train_epoch_start does not.
        self.model.eval()
        set_current("calibrating")  # the work has begun (cli.py: a failure from here on is not a refusal)

    @override
    def setup(self, stage: str) -> None:
        self.check_contracts(self.trainer, self)
        self.noise_order = run_flavor(self.trainer).noise_order

    def check_contracts(self, trainer, pl_module) -> None:
        """The run's flavour against the noise (at setup, and in preflight before the run folder exists)."""
        flavor = run_flavor(trainer)
        if flavor.noise_order == "reference" and self.hparams.noise != "mask":
            raise ValueError(f"model.noise={self.hparams.noise!r}: flavor {flavor.name} replays the "
                             "reference's noise, which is mask noise; use noise: mask or flavor reference")

    @override
    def on_train_epoch_start(self):
        self.model.eval()
        if self.noise_order == "reference":  # every epoch replays the same stream (the reference draws it once)
            self._noise_generator = torch.Generator().manual_seed(self.hparams.seed)

    @override
    def training_step(self, batch, batch_idx):
        set_current(f"calibrating (epoch {self.current_epoch + 1}, batch {batch_idx + 1})")
        with torch.no_grad(), self.out_of_memory_guard():
            batch = {**batch, "keep": self.keep(batch)}
            if self.noise_order == "reference":
                if self._noise_generator is None:  # resumed mid-epoch: the stream restarts (not the reference's)
                    self._noise_generator = torch.Generator().manual_seed(self.hparams.seed)
                batches = reference_noised_batches(batch, self.timesteps, self.mask_token_id, self._noise_generator, eps=self.hparams.eps)
            else:
                batches = noised_batches(batch, self.timesteps, self.mask_token_id, seed=self.hparams.seed, eps=self.hparams.eps,
                                         noise=self.hparams.noise, vocab_size=self.vocab_size)
            for nb in batches:
                dispatch_noised_batch(self.trainer, self, nb)
        return None

    def calibration_forward(self, input_ids, attention_mask=None):
        """The model on a window (`loading.dlm_forward`: DiffusionGemma runs its decoder over it)."""
        return dlm_forward(self.model, input_ids, attention_mask)

    # --- scoring -----------------------------------------------------------------------------------
    def logits(self, input_ids):
        return calibration_forward(self, input_ids).logits

    def masked_logits(self, input_ids):
        """logits(), with the LM head computed only at mask tokens (what held-out scoring reads; mask noise)."""
        if self.hparams.noise != "mask":
            return self.logits(input_ids)
        return logits_at(self.model, lambda: self.logits(input_ids), input_ids == self.mask_token_id)

    @property
    def vocab_size(self) -> int:
        """The range random-token noise draws from: the tokenizer's tokens, never the embedding's padding rows
        (Qwen-style checkpoints pad the embedding past the tokenizer)."""
        rows = self.model.get_input_embeddings().num_embeddings
        return min(rows, len(self.tokenizer)) if self.tokenizer is not None else rows

    def keep(self, batch: dict) -> torch.Tensor:
        """[B, L] positions the forward process never masks: the data's leading special token, or none."""
        return batch["keep"] if self.hparams.keep_special_tokens else torch.zeros_like(batch["keep"])

    @torch.no_grad()
    def score_heldout(self, description: str | None = None) -> dict:
        """Masked-diffusion NLL/perplexity on the data module's held-out windows (summed over DDP ranks)."""
        dm = self.trainer.datamodule
        from pipeline.run.console import track

        metric = MaskedDiffusionPerplexity().to(self.device)
        was_training = self.model.training
        self.model.eval()
        self.heldout_windows = {}  # window index -> (nll, tokens): for paired dense-vs-pruned differences
        loader = dm.heldout_dataloader()
        for batch in track(loader, description or "scoring held-out text", unit="batches"):
            ids = batch["input_ids"].to(self.device)
            nll, scored = elbo_nll(
                self.masked_logits, ids, self.keep(batch).to(self.device), [int(i) for i in batch["index"]],
                self.mask_token_id, n_timesteps=self.hparams.heldout_timesteps, seed=self.hparams.seed,
                eps=self.hparams.eps, noise=self.hparams.noise, vocab_size=self.vocab_size,
            )
            real = (batch["index"] >= 0).double()  # DDP padding windows count for nothing
            for i, n, s in zip(batch["index"].tolist(), nll.tolist(), scored.tolist()):
                if i >= 0:
                    self.heldout_windows[int(i)] = (float(n), float(s))
            metric.update((nll * real).to(self.device), (scored * real).to(self.device))
        self.model.train(was_training)
        scores = metric.compute()
        if not scores["tokens"]:
            raise ValueError("data.heldout_samples: no held-out token was scored (the held-out text is shorter than one "
                             "window); give more held-out text or a smaller data.seqlen")
        return scores


def device_budget() -> int | None:
    """SINKPRUNE_DEVICE_BUDGET (a size: 20GiB, 8e9) in bytes, None when unset."""
    budget = os.environ.get("SINKPRUNE_DEVICE_BUDGET")
    if not budget:
        return None
    try:
        return mp.parse_bytes(budget)
    except ValueError as exc:
        raise ValueError(f"SINKPRUNE_DEVICE_BUDGET={budget}: {exc}") from None


def device_free_bytes(device: torch.device, held: int = 0) -> int:
    """Free memory of the compute device: SINKPRUNE_DEVICE_BUDGET when set, else CUDA's free memory plus `held` (bytes
    of the model already there), else (the CPU computes) the available CPU memory."""
    budget = device_budget()
    if budget is not None:
        return budget
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] + held
    return cpu_free_bytes()


def cpu_free_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2**50


def validate_timesteps(timesteps: int | list[float]) -> list[float]:
    if isinstance(timesteps, int):
        return timestep_grid(timesteps)
    values = [float(t) for t in timesteps]
    bad = [t for t in values if not 0.0 < t <= 1.0]
    if not values or bad:
        raise ValueError(f"model.timesteps={timesteps!r}: every timestep must be in (0, 1]; e.g. 10 or [0.1, 0.5, 1.0]")
    return values
