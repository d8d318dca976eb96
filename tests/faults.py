"""Test-only callbacks that inject faults into a real `cli.py fit` run (listed in trainer.callbacks by class_path).

    FailOnRank      raises on one rank at one hook (DDP failure handling)
    PoisonInput     replaces one module's input by NaN/Inf from the calibration epoch on
    PoisonWeight    sets one parameter of the model to NaN at the start of calibration
    OutOfMemoryInBlock  a transformer block raises torch.cuda.OutOfMemoryError once calibration runs
"""
from __future__ import annotations

import os
import sys
import time

import torch
from lightning.pytorch.callbacks import Callback


class InjectedFailure(RuntimeError):
    """The error FailOnRank raises; the test looks for its message in the command's output."""


class FailOnRank(Callback):
    """On global rank `rank`, at `hook`: raise InjectedFailure (mode "raise") or die at once with exit code 3
    (mode "exit", as a segfault or the OOM killer would). Before failing it prints `FAULT-INJECTED <unix time>`
    to stderr, so a test can measure how long the run takes to stop after the failure."""

    HOOKS = ("setup", "on_fit_start", "on_train_batch_start", "on_train_epoch_end", "on_train_end")
    STAMP = "FAULT-INJECTED"

    def __init__(self, rank: int = 1, hook: str = "on_train_batch_start", mode: str = "raise", message: str = "injected failure"):
        if hook not in self.HOOKS:
            raise ValueError(f"FailOnRank.hook={hook!r}: use one of {self.HOOKS}")
        if mode not in ("raise", "exit"):
            raise ValueError(f"FailOnRank.mode={mode!r}: use 'raise' or 'exit'")
        self.rank, self.hook, self.mode, self.message = rank, hook, mode, message

    def _maybe_fail(self, trainer, hook: str) -> None:
        if hook != self.hook or trainer.global_rank != self.rank:
            return
        print(f"{self.STAMP} {time.time()}", file=sys.stderr, flush=True)
        if self.mode == "exit":
            os._exit(3)
        raise InjectedFailure(f"{self.message} on rank {self.rank} in {hook}")

    def setup(self, trainer, pl_module, stage=None):
        self._maybe_fail(trainer, "setup")

    def on_fit_start(self, trainer, pl_module):
        self._maybe_fail(trainer, "on_fit_start")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._maybe_fail(trainer, "on_train_batch_start")

    def on_train_epoch_end(self, trainer, pl_module):
        self._maybe_fail(trainer, "on_train_epoch_end")

    def on_train_end(self, trainer, pl_module):
        self._maybe_fail(trainer, "on_train_end")


def _poisoned(x: torch.Tensor, value: float) -> torch.Tensor:
    return torch.full_like(x, value)


class PoisonInput(Callback):
    """From on_train_start (after the dense scoring), `module`'s input (first positional argument, or
    `hidden_states`) is replaced by `value` (nan, inf) in every forward: the module's own input is poisoned."""

    def __init__(self, module: str, value: float = float("nan")):
        self.module, self.value = module, float(value)
        self._handle = None

    def on_train_start(self, trainer, pl_module):
        target = dict(pl_module.model.named_modules())[self.module]

        def hook(mod, args, kwargs):
            if args:
                return (_poisoned(args[0], self.value), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": _poisoned(kwargs["hidden_states"], self.value)}

        self._handle = target.register_forward_pre_hook(hook, with_kwargs=True)

    def teardown(self, trainer, pl_module, stage=None):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class PoisonWeight(Callback):
    """At on_train_start, one entry of parameter `param` (a full name, e.g. a LayerNorm's weight) becomes NaN."""

    def __init__(self, param: str, value: float = float("nan")):
        self.param, self.value = param, float(value)

    def on_train_start(self, trainer, pl_module):
        with torch.no_grad():
            dict(pl_module.model.named_parameters())[self.param].view(-1)[0] = self.value


class Stamp(Callback):
    """Prints `STAMP <hook> <unix time>` to stderr at `hook` (on its `batch`-th call for batch hooks), then
    sleeps `hold` seconds there, so a test can signal the process at a known phase."""

    PREFIX = "STAMP"

    def __init__(self, hook: str = "on_train_end", batch: int = 1, hold: float = 0.0):
        self.hook, self.batch, self.hold = hook, batch, hold

    def _stamp(self, hook: str, batch_idx: int = 0) -> None:
        if hook == self.hook and batch_idx + 1 == self.batch:
            print(f"{self.PREFIX} {hook} {time.time()}", file=sys.stderr, flush=True)
            time.sleep(self.hold)

    def on_fit_start(self, trainer, pl_module):
        self._stamp("on_fit_start")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._stamp("on_train_batch_end", batch_idx)

    def on_train_end(self, trainer, pl_module):
        self._stamp("on_train_end")


class OutOfMemoryInBlock(Callback):
    """From the start of calibration (after the structural forwards of fit start), the forward of block `block`
    raises torch.cuda.OutOfMemoryError, as the CUDA caching allocator does when an allocation fails."""

    def __init__(self, block: int = 0):
        self.block = block

    def on_train_start(self, trainer, pl_module):
        from pipeline.model.calibration import find_blocks

        def fail(module, args):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

        find_blocks(pl_module.model)[self.block][1].register_forward_pre_hook(fail)
