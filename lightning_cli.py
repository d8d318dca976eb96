"""The LightningCLI behind `cli.py` (imported only once a run starts, so `--help` stays fast)."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from jsonargparse import ArgumentError, Namespace
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import pipeline.run.strategy  # noqa: F401  (registers calibration_ddp strategies)
from pipeline.run.phase import set_current

from pipeline.run.console import quiet_libraries  # noqa: E402

quiet_libraries(seed=None)  # Lightning sets its loggers up at import: quiet them before LightningCLI seeds and logs
CLEAN_ERRORS = (ValueError, OSError, RuntimeError, ArithmeticError, ArgumentError, MisconfigurationException)
SINK_STATS = "callbacks.sink_stats.SinkStatsCallback"
PRUNE = "callbacks.prune.PruneCallback"
QUANTIZE = "callbacks.quantize.QuantizeCallback"
EVALUATE = "callbacks.evaluate.EvaluateExportCallback"
CHECKPOINT = "callbacks.checkpoint.CalibrationCheckpoint"
RUN_FOLDER_ENV = "SINKPRUNE_RUN_FOLDER"  # "<configured>\t<chosen>": ranks started later follow rank 0's choice


class SinkPruneCLI(LightningCLI):
    result_dirs: list = []  # (field, folder, existed before the run): removed again if the run fails
    short_flags: dict = {}  # --method / --sparsity / --n-m / --overwrite / --checkpoint, applied to the recipe
    print_config: str | None = None  # --print_config[=options]: printed once the short flags are applied
    run_root: str | None = None  # the run folder this run writes (a version folder when the configured one was taken)
    run_root_existed: bool = True  # whether it was there before this run (a refused run removes one it made)
    run_root_base: Path | None = None  # its nearest folder that was there before this run
    configured_root: str | None = None
    checkpoints: list = []  # the last.ckpt each CalibrationCheckpoint of this run writes
    started: float = 0.0  # when this run's checks passed (a checkpoint older than that is not this run's)

    def add_arguments_to_parser(self, parser):
        parser.link_arguments("model.init_args.pretrained", "data.init_args.tokenizer")

    def _instantiate_trainer(self, config, callbacks):
        """Our calibration bar instead of Lightning's "Epoch 0" one (unless bars are off or the recipe has one)."""
        from lightning.pytorch.callbacks.progress import ProgressBar

        from pipeline.run.progress import CalibrationProgressBar

        listed = [*(config.get("callbacks") or []), *callbacks]
        if config.get("enable_progress_bar") is not False and not any(isinstance(cb, ProgressBar) for cb in listed):
            callbacks = [*callbacks, CalibrationProgressBar()]
        config["default_root_dir"] = self._run_folder(config.get("default_root_dir") or os.getcwd(), listed)
        return super()._instantiate_trainer(config, callbacks)

    def _run_folder(self, configured: str, callbacks: list) -> str:
        """The configured run folder, or a fresh version folder when a previous run's results are in it."""
        from pipeline.run.outputs import run_folder
        from preflight import holds_results

        rank = int(os.environ.get("LOCAL_RANK", 0)) or int(os.environ.get("RANK", 0))
        inherited, _, chosen = os.environ.get(RUN_FOLDER_ENV, "").partition("\t")
        if rank == 0 or inherited != configured:  # a rank without rank 0's choice makes the same one (run_folder)
            chosen = str(run_folder(configured, lambda folder: holds_results(callbacks, folder)))
            os.environ[RUN_FOLDER_ENV] = f"{configured}\t{chosen}"
            if chosen != configured and rank == 0:
                import textwrap

                print(textwrap.fill(f"{configured} holds a previous run's results (kept); this run writes to {chosen} "
                                    "(--overwrite replaces them instead)", 80, break_on_hyphens=False), file=sys.stderr)
        SinkPruneCLI.configured_root, SinkPruneCLI.run_root = configured, chosen
        SinkPruneCLI.run_root_existed = Path(chosen).expanduser().exists()
        SinkPruneCLI.run_root_base = next(p for p in Path(chosen).expanduser().absolute().parents if p.exists())
        if self.subcommand:
            self.config[self.subcommand]["trainer"]["default_root_dir"] = chosen
        return chosen

    def before_instantiate_classes(self):
        config = self.config[self.subcommand] if self.subcommand else self.config
        apply_method_flags(config, SinkPruneCLI.short_flags)
        if SinkPruneCLI.print_config is not None:  # jsonargparse's own would print before the short flags apply
            skip_none = "skip_null" in SinkPruneCLI.print_config
            print(self._parser(self.subcommand).dump(config, skip_none=skip_none), end="")
            raise SystemExit(0)
        from pipeline.run.console import quiet_libraries

        seed = config.get("model", {}).get("init_args", {}).get("seed", 0)
        quiet_libraries(seed if config.get("seed_everything") in (None, True) else None)

    def before_fit(self):
        from preflight import check_run

        config = self.config[self.subcommand] if self.subcommand else self.config
        set_current("checking the inputs")
        SinkPruneCLI.result_dirs = check_run(self.model, self.datamodule, self.trainer, config.get("ckpt_path"),
                                             config.get("trainer", {}).get("max_epochs"))
        from pipeline.run.protocols import WritesCheckpoints, callbacks_of

        SinkPruneCLI.started = time.time()
        SinkPruneCLI.checkpoints = [cb.last_checkpoint(self.trainer) for cb in callbacks_of(self.trainer, WritesCheckpoints)]
        from pipeline.run.console import log_to_run_folder

        log_to_run_folder(self.trainer.default_root_dir)
        set_current("loading the model")
        # recorded in results.json, so a run can be repeated from its own output
        self.model.resolved_config = self.parser.dump(self.config, skip_none=False, format="yaml")


def apply_method_flags(config, flags: dict) -> None:
    """--method / --sparsity / --n-m onto the PruneCallback of trainer.callbacks (a SinkStatsCallback is added
    before it for a sink_* method when the recipe has none); --quantize / --group-size: add_quantize; --overwrite
    onto every callback that writes a result folder; --checkpoint adds a CalibrationCheckpoint (<run folder>/checkpoints)
    unless there is one."""
    flags = dict(flags)
    callbacks = config["trainer"].get("callbacks") or []
    if flags.pop("overwrite", False):
        for cb in callbacks:
            if getattr(cb, "class_path", None) in (SINK_STATS, EVALUATE):
                cb.init_args = cb.init_args or Namespace()
                cb.init_args.overwrite = True
    if flags.pop("checkpoint", False) and not any(getattr(cb, "class_path", None) == CHECKPOINT for cb in callbacks):
        callbacks.append(Namespace(class_path=CHECKPOINT, init_args=Namespace(dirpath=None, every_n_batches=1)))
        config["trainer"]["callbacks"] = callbacks
    if not flags:
        return
    index = next((i for i, cb in enumerate(callbacks) if getattr(cb, "class_path", None) == PRUNE), None)
    if index is None:
        raise ValueError(f"--{'/--'.join(k.replace('_', '-') for k in flags)}: this recipe has no PruneCallback; "
                         "start from a pruning recipe (e.g. --config tiny_sink50)")
    args = callbacks[index].init_args
    if "method" in flags:  # (checked with the callback's other arguments when it is built)
        args.method = flags["method"]
    if args.method == "dense":  # nothing pruned: the recipe's sparsity / n_m do not apply
        args.sparsity, args.n_m = None, None
    if "sparsity" in flags:
        args.sparsity, args.n_m = flags["sparsity"], None
    if "n_m" in flags:
        args.n_m, args.sparsity = flags["n_m"], None
    if "quantize" in flags or "group_size" in flags:
        add_quantize(callbacks, index, flags)
    if str(args.method).startswith("sink_") and not any(getattr(cb, "class_path", None) == SINK_STATS for cb in callbacks[:index]):
        callbacks.insert(index, Namespace(class_path=SINK_STATS, init_args=Namespace()))


def add_quantize(callbacks: list, index: int, flags: dict) -> None:
    """--quantize SCHEME [--group-size G]: a QuantizeCallback right after the PruneCallback at `index` (the recipe's own
    QuantizeCallback, if it lists one, takes the settings instead)."""
    from pipeline.maths.quantize import SCHEMES

    scheme = flags.get("quantize")
    if scheme is not None and scheme not in SCHEMES:
        raise ValueError(f"--quantize {scheme}: unknown; choose one of {', '.join(SCHEMES)}")
    found = next((cb for cb in callbacks if getattr(cb, "class_path", None) == QUANTIZE), None)
    if found is None:
        if scheme is None:
            raise ValueError("--group-size: this recipe quantizes nothing; add --quantize w4a16")
        found = Namespace(class_path=QUANTIZE, init_args=Namespace())
        callbacks.insert(index + 1, found)
    if scheme is not None:
        found.init_args.scheme, found.init_args.bits = scheme, None
    if "group_size" in flags:
        value = flags["group_size"]
        try:
            found.init_args.group_size = None if value in ("none", "channel") else int(value)
        except ValueError:
            raise ValueError(f"--group-size {value}: not an integer; e.g. --group-size 128 (or 'channel')") from None


def one_line_root(root: str, exc: BaseException) -> str:
    if isinstance(exc, MisconfigurationException) and not torch.cuda.is_available():
        root = f"trainer: {root} (this torch sees no CUDA device); use --trainer.accelerator cpu or a CUDA build of torch"
    return root
