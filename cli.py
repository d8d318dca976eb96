"""sinkprune command line: `python cli.py fit --config configs/tiny_sink50.yaml`.

`fit` is one calibration epoch (no gradient): callbacks in `trainer.callbacks` collect sink statistics
and prune; the module scores held-out perplexity before and after.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lightning.pytorch.cli import LightningCLI  # noqa: E402
from torch.multiprocessing.spawn import ProcessException, ProcessRaisedException  # noqa: E402

import pipeline.strategy  # noqa: E402,F401  (registers calibration_ddp strategies)
from pipeline.data import CalibrationData  # noqa: E402
from pipeline.module import DLMModule  # noqa: E402

TRAINER_DEFAULTS = {
    "max_epochs": 1,
    "logger": False,
    "enable_checkpointing": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
    "accelerator": "auto",
    "devices": 1,
}


class SinkPruneCLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        parser.link_arguments("model.init_args.pretrained", "data.init_args.tokenizer")

    def before_fit(self):
        # recorded in results.json, so a run can be repeated from its own output
        self.model.resolved_config = self.parser.dump(self.config, skip_none=False, format="yaml")


def main(args=None):
    try:
        SinkPruneCLI(
            DLMModule,
            CalibrationData,
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_defaults=TRAINER_DEFAULTS,
            save_config_callback=None,
            args=args,
        )
    except CLEAN_ERRORS as exc:
        if os.environ.get("SINKPRUNE_TRACEBACK"):
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except ProcessException as exc:
        # A rank of a spawned run (calibration_ddp_spawn) failed; torch has already stopped the other ranks.
        # Its exception lives in the child, so all we hold is its traceback text (or its exit code / signal).
        if os.environ.get("SINKPRUNE_TRACEBACK"):
            raise
        kind, message, clean = rank_error(exc)
        if not clean:  # not one of the errors we report in one line: show where it came from
            print(exc.msg.strip(), file=sys.stderr)
        print(f"error: rank {exc.error_index}: {message if clean else f'{kind}: {message}'}", file=sys.stderr)
        sys.exit(2 if clean else 1)


CLEAN_ERRORS = (ValueError, OSError, RuntimeError, ArithmeticError)


def rank_error(exc: ProcessException) -> tuple[str, str, bool]:
    """(exception type, first line of its message, whether the type is one of CLEAN_ERRORS) of a failed rank.

    ProcessRaisedException carries the child's formatted traceback: the exception line is the first
    unindented line after its last "Traceback (most recent call last):" header."""
    if not isinstance(exc, ProcessRaisedException):  # exited with a code or killed by a signal: no exception
        what = exc.msg.replace(f"process {exc.error_index} ", "", 1)
        return "ProcessExitedException", f"{what} (killed, out of memory, or os._exit?); the other ranks were stopped", True
    lines = exc.msg.strip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    header = next((line for line in lines[starts[-1] + 1:] if line and not line[0].isspace()), None) if starts else None
    if header is None:
        return "Exception", (lines[-1] if lines else "a rank failed"), False
    kind, _, message = header.partition(": ")
    return kind, message or kind, _is_clean(kind)


def _is_clean(qualified_name: str) -> bool:
    """Whether the exception class named in a traceback (builtin, or module.Class) is one of CLEAN_ERRORS."""
    import builtins
    import importlib

    module, _, name = qualified_name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module) if module else builtins, name)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(cls, type) and issubclass(cls, CLEAN_ERRORS)


def one_line(exc: BaseException) -> str:
    """The root cause's first line: jsonargparse wraps a callback's own ValueError in a generic one."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


if __name__ == "__main__":
    main()
