"""sinkprune command line: `python cli.py fit --config configs/tiny_sink50.yaml`.

`fit` is one calibration epoch (no gradient): callbacks in `trainer.callbacks` collect sink statistics
and prune; the module scores held-out perplexity before and after.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lightning.pytorch.cli import LightningCLI  # noqa: E402

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
    except (ValueError, OSError, RuntimeError, ArithmeticError) as exc:
        if os.environ.get("SINKPRUNE_TRACEBACK"):
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)


def one_line(exc: BaseException) -> str:
    """The root cause's first line: jsonargparse wraps a callback's own ValueError in a generic one."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


if __name__ == "__main__":
    main()
