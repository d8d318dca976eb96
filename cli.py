"""sinkprune command line: `python cli.py fit --config configs/tiny_sink50.yaml`.

`fit` is one calibration epoch (no gradient): callbacks in `trainer.callbacks` collect sink statistics
and prune; the module scores held-out perplexity before and after.

Every failure a user can cause ends in one line `error: <field>: <problem>; <fix>` and exit code 2,
before the model's weights load where the input allows (preflight.py).  SIGTERM and SIGINT stop
the run within seconds with exit code 143 / 130 and a line saying where it stopped.  A failed or stopped
run removes the result folders it created.  Tracebacks: `SINKPRUNE_TRACEBACK=1` or `--debug`.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from jsonargparse import ArgumentError  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402
from lightning.pytorch.utilities.exceptions import MisconfigurationException  # noqa: E402
from torch.multiprocessing.spawn import ProcessException, ProcessRaisedException  # noqa: E402

import pipeline.run.strategy  # noqa: E402,F401  (registers calibration_ddp strategies)
from pipeline.model.data import CalibrationData  # noqa: E402
from pipeline.model.module import DLMModule  # noqa: E402
from pipeline.run.phase import current, set_current  # noqa: E402

TRAINER_DEFAULTS = {
    "max_epochs": 1,
    "logger": False,
    "enable_checkpointing": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
    "accelerator": "auto",
    "devices": 1,
}


class RunInterrupted(BaseException):
    """SIGTERM or SIGINT: a BaseException so that no `except Exception` in a library swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class SinkPruneCLI(LightningCLI):
    result_dirs: list = []  # (field, folder, existed before the run): removed again if the run fails

    def add_arguments_to_parser(self, parser):
        parser.link_arguments("model.init_args.pretrained", "data.init_args.tokenizer")

    def before_fit(self):
        from preflight import check_run

        config = self.config[self.subcommand] if self.subcommand else self.config
        set_current("checking the inputs")
        SinkPruneCLI.result_dirs = check_run(self.model, self.datamodule, self.trainer, config.get("ckpt_path"),
                                             config.get("trainer", {}).get("max_epochs"))
        set_current("loading the model")
        # recorded in results.json, so a run can be repeated from its own output
        self.model.resolved_config = self.parser.dump(self.config, skip_none=False, format="yaml")


def _on_signal(signum, frame):
    raise RunInterrupted(signum)


def remove_partial_outputs() -> None:
    """A failed run leaves nothing: result folders it created go, and so do its temp folders."""
    for _field, folder, existed in SinkPruneCLI.result_dirs:
        if not existed and folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        if folder.parent.is_dir():
            for tmp in folder.parent.glob(f".{folder.name}.tmp-{os.getpid()}-*"):
                shutil.rmtree(tmp, ignore_errors=True)
    SinkPruneCLI.result_dirs = []


def main(args=None):
    from_argv = args is None
    args = list(sys.argv[1:] if from_argv else args)
    debug = "--debug" in args or bool(os.environ.get("SINKPRUNE_TRACEBACK"))
    args = [a for a in args if a != "--debug"]
    if from_argv:  # LightningCLI warns when given both argv and args
        sys.argv = [sys.argv[0], *args]
    handlers = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    set_current("parsing the config")
    try:
        check_config_files(args)
        SinkPruneCLI(
            DLMModule,
            CalibrationData,
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_defaults=TRAINER_DEFAULTS,
            save_config_callback=None,
            parser_kwargs={"exit_on_error": False},
            args=None if from_argv else args,
        )
    except RunInterrupted as exc:
        where = current()
        remove_partial_outputs()
        if debug:
            raise
        print(f"error: stopped by {exc} while {where}; nothing was saved. Run the same command again to start over"
              f"{resume_hint(args)}", file=sys.stderr)
        sys.exit(128 + exc.signum)
    except CLEAN_ERRORS as exc:
        remove_partial_outputs()
        if debug:
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
    except BaseException:
        remove_partial_outputs()
        raise
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


CLEAN_ERRORS = (ValueError, OSError, RuntimeError, ArithmeticError, ArgumentError, MisconfigurationException)


def check_config_files(args: list[str]) -> None:
    """Each --config file exists and is valid YAML, reported with its own name and line; a resume checkpoint
    loads (LightningCLI unpickles it while parsing, before any hook of ours runs)."""
    import yaml

    from preflight import check_checkpoint

    args = [part for a in args for part in (a.split("=", 1) if a.startswith("--") and "=" in a else [a])]
    for flag, value in zip(args, args[1:]):
        if flag == "--ckpt_path":
            check_checkpoint(value)
        if flag != "--config":
            continue
        path = Path(value).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--config {value}: no such file; give a path to a YAML config (see configs/)")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise ValueError(f"--config {value}: not UTF-8 text (byte {exc.start}); give a YAML file") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ValueError(f"--config {value}{where}: invalid YAML ({problem}); fix the syntax there") from None
        if isinstance(loaded, dict) and loaded.get("ckpt_path"):
            check_checkpoint(loaded["ckpt_path"])


def resume_hint(args: list[str]) -> str:
    """Where a CalibrationCheckpoint of this run would be, when one was saved."""
    import glob

    root = next((v for f, v in zip(args, args[1:]) if f == "--config"), None)
    if root is None:
        return ""
    try:
        import yaml

        config = yaml.safe_load(Path(root).read_text())
        dirs = [cb["init_args"]["dirpath"] for cb in config["trainer"]["callbacks"] if cb["class_path"].endswith("CalibrationCheckpoint")]
    except Exception:
        return ""
    found = [p for d in dirs for p in glob.glob(str(Path(d).expanduser() / "last.ckpt"))]
    return f", or resume with --ckpt_path {found[0]}" if found else ""


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
    """The root cause's first line: jsonargparse wraps a callback's own ValueError in a generic one.

    For a config value of the wrong type, jsonargparse's nested report becomes `field path: problem`."""
    chain = [exc]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    firsts = [str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__ for e in chain]
    root = firsts[-1]
    path: list[str] = []
    for line in firsts:
        found = re.match(r'Parser key "([^"]+)"', line) or re.match(r"Problem with given class_path '([^']+)'", line)
        if found and (not path or path[-1] != found.group(1)):
            path.append(found.group(1))
    wrong_type = re.match(r"Expected a <class '(\w+)'>\. Got value: (.*)", root)
    if wrong_type:
        root = f"expected a {wrong_type.group(1)}, got {wrong_type.group(2)!r}; write a plain number (e.g. 0.5, not '50%')"
    if isinstance(exc, MisconfigurationException) and not torch.cuda.is_available():
        root = f"trainer: {root} (this torch sees no CUDA device); use --trainer.accelerator cpu or a CUDA build of torch"
    return f"{' '.join(path)}: {root}" if path else root


if __name__ == "__main__":
    main()
