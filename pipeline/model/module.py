"""DLMModule: a LightningModule around a Hugging Face diffusion LM, for calibration without training.

`fit` runs calibration epochs: no optimizer, no gradient.  Each training step noises the batch at every
timestep of the schedule and hands each noised batch to the callbacks (see pipeline/model/calibration.py).
`score_heldout` gives held-out masked-diffusion perplexity; EvaluateExportCallback calls it (dense and pruned).
"""
from __future__ import annotations

import warnings

import lightning as L
import torch
from typing_extensions import override

from pipeline.model.calibration import calibration_forward, dispatch_noised_batch, noised_batches, reference_noised_batches
from pipeline.model.head import logits_at
from pipeline.maths.diffusion import DEFAULT_EPS, NOISES, check_window, timestep_grid
from pipeline.model.loading import check_mask_id, dlm_forward, load_dlm, resolve_mask_token_id, resolve_path
from pipeline.run.phase import set_current
from pipeline.run.protocols import run_flavor
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
    ):
        """Args:
            keep_special_tokens: never mask the special token the data puts first (BOS / [CLS]), in
                calibration and in held-out scoring, for models trained that way (minilm-dlm, tiny-llada).
                The default masks every position, like the reference and LLaDA's pretraining.
            noise: "mask" (a noised position becomes the mask token: LLaDA, Dream, SDAR) or "uniform" (it becomes
                a uniformly random vocabulary token: DiffusionGemma-style random-token noise), in calibration
                and in held-out scoring.

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
        resolve_path(pretrained)  # a missing local path fails here, before anything is loaded
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
        try:
            self.model, self.tokenizer = load_dlm(
                hp.pretrained, trust_remote_code=hp.trust_remote_code, torch_dtype=hp.torch_dtype,
                model_class=hp.model_class, attn_implementation=hp.attn_implementation,
            )
        except torch.OutOfMemoryError as exc:
            raise RuntimeError(f"{hp.pretrained} does not fit in the memory of {self._target_device()}: {FIT_HINT}") from exc
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

    @override
    def setup(self, stage: str) -> None:
        self.noise_order = run_flavor(self.trainer).noise_order
        if self.noise_order == "reference" and self.hparams.noise != "mask":
            raise ValueError(f"model.noise={self.hparams.noise!r}: flavor {run_flavor(self.trainer).name} replays the "
                             "reference's noise, which is mask noise; use noise: mask or flavor reference")

    @override
    def on_train_epoch_start(self):
        self.model.eval()
        if self.noise_order == "reference":  # every epoch replays the same stream (the reference draws it once)
            self._noise_generator = torch.Generator().manual_seed(self.hparams.seed)

    @override
    def training_step(self, batch, batch_idx):
        set_current(f"calibrating (epoch {self.current_epoch + 1}, batch {batch_idx + 1})")
        with torch.no_grad():
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


def validate_timesteps(timesteps: int | list[float]) -> list[float]:
    if isinstance(timesteps, int):
        return timestep_grid(timesteps)
    values = [float(t) for t in timesteps]
    bad = [t for t in values if not 0.0 < t <= 1.0]
    if not values or bad:
        raise ValueError(f"model.timesteps={timesteps!r}: every timestep must be in (0, 1]; e.g. 10 or [0.1, 0.5, 1.0]")
    return values
