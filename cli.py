"""sinkprune command line: `python cli.py fit --config configs/tiny_sink50.yaml`.

`fit` is one calibration epoch (no gradient): callbacks in `trainer.callbacks` collect sink statistics
and prune; the module scores held-out perplexity before and after.

Every failure a user can cause ends in one line `error: <field>: <problem>; <fix>` and exit code 2,
before the model's weights load where the input allows (preflight.py).  SIGTERM and SIGINT stop
the run within seconds with exit code 143 / 130 and a line saying where it stopped.  A failed or stopped
run removes the result folders it created.  Tracebacks: `SINKPRUNE_TRACEBACK=1` or `--debug`.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

from pipeline.run.phase import current, set_current  # noqa: E402  (stdlib only)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

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


def _on_signal(signum, frame):
    raise RunInterrupted(signum)


BEFORE_THE_WORK = ("starting", "parsing the config", "checking the inputs", "loading the model")  # (phase names)


def remove_partial_outputs(run_folder: bool = True) -> None:
    """A failed run leaves nothing: result folders it created go, and so do its temp folders; run_folder: also the run
    folder it created, when nothing but run.log is in it (a refused run; a checkpoint or a result keeps it)."""
    holder = sys.modules.get("lightning_cli")
    cli_class = getattr(holder, "SinkPruneCLI", None)
    root = Path(cli_class.run_root).expanduser() if cli_class is not None and cli_class.run_root else None
    refused = current() in BEFORE_THE_WORK  # (a run that failed later keeps its run.log: it may say why)
    rank_zero = not (int(os.environ.get("LOCAL_RANK", 0)) or int(os.environ.get("RANK", 0)))
    if run_folder and refused and rank_zero and root is not None and not cli_class.run_root_existed and root.is_dir() \
            and all(p == root / "run.log" or p.is_dir() for p in root.rglob("*")):
        from pipeline.run.console import close_run_log

        close_run_log()
        shutil.rmtree(root, ignore_errors=True)
        with contextlib.suppress(OSError):
            for parent in root.absolute().parents:  # the empty folders above it that this run made
                if cli_class.run_root_base is None or parent == cli_class.run_root_base or any(parent.iterdir()):
                    break
                parent.rmdir()
    for _field, folder, existed in (cli_class.result_dirs if cli_class else []):
        if not existed and folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        if folder.parent.is_dir():
            for tmp in folder.parent.glob(f".{folder.name}.tmp-{os.getpid()}-*"):
                shutil.rmtree(tmp, ignore_errors=True)
    if cli_class is not None:
        cli_class.result_dirs = []


def _run(args: list[str], from_argv: bool) -> list[str]:
    """Quiet the libraries, apply the short flags, check the config files, run LightningCLI; returns the args."""
    from pipeline.run.console import quiet_warnings

    quiet_warnings()
    args, flags = short_flags(args)
    args, print_config = without_print_config(args)
    args = check_config_files(args)
    if from_argv:
        sys.argv = [sys.argv[0], *args]
    from pipeline.model.data import CalibrationData
    from pipeline.model.module import DLMModule
    from lightning_cli import SinkPruneCLI

    SinkPruneCLI.short_flags, SinkPruneCLI.print_config, SinkPruneCLI.checkpoints = flags, print_config, []
    SinkPruneCLI.run_root, SinkPruneCLI.run_root_existed = None, True  # (set when this run picks its folder)
    SinkPruneCLI(DLMModule, CalibrationData, subclass_mode_model=True, subclass_mode_data=True,
                 trainer_defaults=TRAINER_DEFAULTS, save_config_callback=None, parser_kwargs={"exit_on_error": False},
                 args=None if from_argv else args)
    return args


def main(args=None):
    from_argv = args is None
    args = list(sys.argv[1:] if from_argv else args)
    debug = "--debug" in args or bool(os.environ.get("SINKPRUNE_TRACEBACK"))
    args = [a for a in args if a != "--debug"]
    if from_argv:  # LightningCLI warns when given both argv and args
        sys.argv = [sys.argv[0], *args]
    if args[:1] == ["plan"]:
        sys.exit(plan(args[1:]))
    if wants_short_help(args):
        print(help_text())
        return
    if "--help-all" in args:
        args = ["--help" if a == "--help-all" else a for a in args]
    handlers = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    set_current("parsing the config")
    given = list(args)
    try:
        args = _run(args, from_argv)
    except RunInterrupted as exc:
        where = current()
        remove_partial_outputs()
        if debug:
            raise
        print(f"error: stopped by {exc} while {where}; {resume_hint(given)}", file=sys.stderr)
        sys.exit(128 + exc.signum)
    except _clean_errors() as exc:
        remove_partial_outputs()
        if debug:
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except _process_exception() as exc:
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
        remove_partial_outputs(run_folder=False)  # (its run.log may say why)
        raise
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def __getattr__(name: str):
    """Lightning-heavy names load on first use, so `--help` prints before torch is imported."""
    if name in ("SinkPruneCLI", "CLEAN_ERRORS"):
        import lightning_cli

        return getattr(lightning_cli, name)
    raise AttributeError(f"module 'cli' has no attribute {name!r}")


def _process_exception() -> type:
    from torch.multiprocessing.spawn import ProcessException

    return ProcessException


def _clean_errors() -> tuple:
    from lightning_cli import CLEAN_ERRORS

    return CLEAN_ERRORS


def recipes() -> list[str]:
    """The packaged recipes (configs/*.yaml), by name."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def find_config(value: str) -> Path:
    """A --config value: a file, else NAME or NAME.yaml among the packaged recipes (configs/)."""
    path = Path(value).expanduser()
    if path.is_file():
        return path
    name = Path(value).name
    for candidate in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml", CONFIG_DIR / value, CONFIG_DIR / f"{value}.yaml"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"--config {value}: no such file or recipe; give a YAML path or one of the recipes "
                            f"{', '.join(recipes())}")


def check_config_files(args: list[str]) -> list[str]:
    """Each --config file exists and is valid YAML, reported with its own name and line; a resume checkpoint
    loads (LightningCLI unpickles it while parsing, before any hook of ours runs).  Returns the arguments with
    each --config NAME of a packaged recipe replaced by its path."""
    import yaml

    from preflight import check_checkpoint

    args = [part for a in args for part in (a.split("=", 1) if a.startswith("--") and "=" in a else [a])]
    for i, (flag, value) in enumerate(zip(args, args[1:])):
        if flag == "--ckpt_path":
            check_checkpoint(value)
        if flag != "--config":
            continue
        path = find_config(value)
        args[i + 1] = str(path)
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
        args[i + 1] = with_packaged_pieces(path, loaded)
    return args


def with_packaged_pieces(path: Path, loaded) -> str:
    """A recipe copied out of configs/ names its pieces (model/minilm_dlm.yaml) relative to configs/: a relative
    piece not found next to the YAML file is taken from the package's configs/.  Returns the file's path, or, when
    a piece came from the package, the recipe as a YAML string with every relative piece made absolute (the file
    itself is not written)."""
    import yaml

    here, borrowed = path.resolve().parent, []

    def resolve(value):
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v) for v in value]
        if not isinstance(value, str) or not value.endswith((".yaml", ".yml")) or Path(value).is_absolute():
            return value
        if (here / value).is_file():
            return str(here / value)
        if (CONFIG_DIR / value).is_file():
            borrowed.append(value)
            return str(CONFIG_DIR / value)
        if Path(value).is_file():  # a path from the working directory: left as written
            return value
        raise FileNotFoundError(f"--config {path}: its piece {value} is neither next to it ({here}) nor among the "
                                f"package's configs; copy the piece there or give its absolute path")

    resolved = resolve(loaded) if isinstance(loaded, dict) else loaded
    return yaml.safe_dump(resolved, sort_keys=False) if borrowed else str(path)


SHORT_FLAGS = {"--method": "method", "--sparsity": "sparsity", "--n-m": "n_m", "--nm": "n_m",
               "--quantize": "quantize", "--group-size": "group_size",
               "--model": "model", "--data": "data", "--output": "output", "-o": "output"}
SWITCHES = {"--overwrite": "overwrite", "--checkpoint": "checkpoint"}  # short flags without a value


def short_flags(args: list[str]) -> tuple[list[str], dict]:
    """The everyday options: --model and --data become model/data overrides and --output the run folder
    (trainer.default_root_dir) here; --method, --sparsity and --n-m are returned, for the PruneCallback.

    `--model X.yaml` and `--data X.yaml` (and class paths) keep LightningCLI's meaning."""
    out, flags, i = [], {}, 0
    while i < len(args):
        arg = args[i]
        flag, eq, inline = arg.partition("=") if arg.startswith("-") else (arg, "", "")
        if flag in SWITCHES and not eq:
            flags[SWITCHES[flag]] = True
            i += 1
            continue
        key = SHORT_FLAGS.get(flag)
        if key is None:
            out.append(arg)
            i += 1
            continue
        if eq:
            value, i = inline, i + 1
        elif i + 1 < len(args):
            value, i = args[i + 1], i + 2
        else:
            raise ValueError(f"{flag}: needs a value; see sinkprune --help")
        if key in ("model", "data") and (value.endswith((".yaml", ".yml", ".json")) or value.rsplit(".", 1)[-1][:1].isupper()
                                         or value.lstrip().startswith("{")):
            out += [flag, value]
        elif key == "model":
            out += ["--model.init_args.pretrained", value]
        elif key == "data":
            out += ["--data.init_args.dataset", value]
        elif key == "output":
            out += ["--trainer.default_root_dir", value]
        elif key == "sparsity":
            try:
                flags["sparsity"] = float(value.rstrip("%")) / (100 if value.endswith("%") else 1)
            except ValueError:
                raise ValueError(f"--sparsity {value}: not a number; e.g. --sparsity 0.5") from None
        elif key == "n_m":
            if not re.fullmatch(r"\d+:\d+", value):
                raise ValueError(f"--n-m {value}: expected N:M, e.g. --n-m 2:4")
            flags["n_m"] = value
        else:
            flags[key] = value
    if "sparsity" in flags and "n_m" in flags:
        raise ValueError("--sparsity and --n-m: two targets for one run (unstructured and N:M); give one")
    return out, flags


def without_print_config(args: list[str]) -> tuple[list[str], str | None]:
    """`--print_config[=options]` out of the arguments: SinkPruneCLI prints the config once the short flags
    are applied (jsonargparse's own action would print it before them)."""
    rest = [a for a in args if a != "--print_config" and not a.startswith("--print_config=")]
    given = [a for a in args if a not in rest]
    return rest, (given[-1].partition("=")[2] if given else None)


def wants_short_help(args: list[str]) -> bool:
    """`sinkprune`, `sinkprune --help`, `sinkprune fit --help`: ours (fast); `--help-all`: Lightning's full list."""
    rest = [a for a in args if a not in ("fit",)]
    return not args or (rest and rest[0] in ("-h", "--help") and len(rest) == 1)


def listing(title: str, names: list[str]) -> str:
    import textwrap

    return textwrap.fill(", ".join(names), 80, initial_indent="    ", subsequent_indent="    ", break_on_hyphens=False,
                         break_long_words=False).join([f"  {title}\n", ""])


def help_text() -> str:
    names = recipes()
    tf5 = [n for n in names if "needs transformers 5" in (CONFIG_DIR / f"{n}.yaml").read_text().partition("\n")[0]]
    tiny = [n for n in names if n.startswith("tiny_") and n not in tf5]
    big = [n for n in names if not n.startswith("tiny_")]
    return f"""usage: sinkprune fit --config RECIPE [--method M] [--sparsity S | --n-m N:M]
         [--quantize Q] [--model M] [--data D] [--output DIR] [--overwrite] [--checkpoint]
       (python cli.py ... is the same)

Sink-aware pruning of diffusion language models (LLaDA, Dream, minilm-dlm).
One `fit` calibrates on a few hundred noised windows (no training), measures
where attention sinks sit at each noise level, prunes every linear layer to the
target sparsity, prints dense-vs-pruned held-out perplexity and benchmark
scores, and saves results.json, masks.safetensors and the pruned model.

methods (--method):
  sink_wanda       Wanda |W|*||X||, each token's activations weighted by 1 - s
                   (s: its sink score)
  sink_sparsegpt   SparseGPT with the same sink-weighted Hessian
  wanda, sparsegpt, magnitude   the usual baselines

recipes (--config NAME, from configs/ of the package; or your own YAML file):
{listing("offline, CPU, about 30 s each:", tiny)}
{listing('transformers 5 only (pip install "transformers>=5.24,<6"):', tf5)}
{listing("GPU, real models:", big)}

everyday options (map onto the recipe's classes):
  --config NAME        a recipe above (with or without .yaml) or a YAML file
  --method M           PruneCallback method (sink_wanda, wanda, ..., dense)
  --sparsity S         fraction of each row's weights pruned: 0.5 (or 50%)
  --n-m N:M            semi-structured instead: N zeros in every M inputs (2:4)
  --quantize Q         then quantize: w4a16 (GPTQ int4, groups of 128) or fp8,
                       saved as compressed-tensors (--method dense: quantize only)
  --group-size G       inputs per int4 scale (default 128; divides every width)
  --model NAME         embedded name (minilm-dlm, tiny-llada), folder or hub id
  --data NAME          wiki-embedded (offline), wikitext2, c4, or a local file
  --output DIR         run folder (sinks/, pruned/, run.log); when it holds a
                       previous run's results, this run writes DIR/version_N
  --overwrite          replace the previous results in the run folder instead
                       (only folders sinkprune wrote)
  --checkpoint         save the calibration every batch (DIR/checkpoints); a
                       stopped run prints the command that resumes it
  --print_config       print the config this command would run, and stop
  --debug              show tracebacks

examples:
  sinkprune fit --config tiny_sink50
  sinkprune fit --config tiny_sink50 --method wanda --n-m 2:4 --output runs/w24
  sinkprune fit --config llada_sink50 --trainer.devices 8 \\
      --trainer.strategy calibration_ddp
  sinkprune plan --model configs/plans/llada2_0_flash --devices 8
      (the memory plan of a run, from a config.json alone)

Every other field is a jsonargparse override (--trainer.devices 8,
--data.init_args.nsamples 64); `sinkprune fit --help-all` lists them all.
Benchmarks alone: `sinkprune-eval --help`."""


def resume_hint(args: list[str]) -> str:
    """The stop line's second half: the checkpoint this run saved and the exact command that resumes from it
    (the same arguments, in the run folder it wrote, with --ckpt_path), or how to make the run resumable."""
    import shlex

    holder = sys.modules.get("lightning_cli")
    cli_class = getattr(holder, "SinkPruneCLI", None)
    saved = [p for p in (cli_class.checkpoints if cli_class else [])
             if Path(p).is_file() and Path(p).stat().st_mtime >= cli_class.started]  # this run's, not an older one
    if not saved:
        return ("nothing was saved. Run the same command again to start over (with --checkpoint a stopped run "
                "can resume)")
    moved = cli_class.run_root != cli_class.configured_root
    replaced = ("--ckpt_path", *(("--output", "-o", "--trainer.default_root_dir") if moved else ()))
    keep, i = [], 0
    while i < len(args):
        if args[i].split("=", 1)[0] in replaced:
            i += 1 if "=" in args[i] else 2
            continue
        keep.append(args[i])
        i += 1
    keep += (["--output", cli_class.run_root] if moved else []) + ["--ckpt_path", str(saved[0])]
    return f"checkpoint {saved[0]}; resume with: {invoked_as()} {shlex.join(keep)}"


def invoked_as() -> str:
    """The program as the user typed it: `python <path>/cli.py` as given, else the console script `sinkprune`."""
    import shlex

    program = sys.argv[0] if sys.argv else ""
    if Path(program).name == "cli.py":
        return f"python {shlex.quote(program)}"
    return "sinkprune"


def rank_error(exc) -> tuple[str, str, bool]:
    """(exception type, first line of its message, whether the type is one of CLEAN_ERRORS) of a failed rank.

    ProcessRaisedException carries the child's formatted traceback: the exception line is the first
    unindented line after its last "Traceback (most recent call last):" header."""
    from torch.multiprocessing.spawn import ProcessRaisedException

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
    return isinstance(cls, type) and issubclass(cls, _clean_errors())


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
    from lightning_cli import one_line_root

    root = one_line_root(root, exc)
    return f"{' '.join(path)}: {root}" if path else root


STATISTICS = {"magnitude": None, "wanda": "act_sq_sum", "sink_wanda": "act_sq_sum", "sparsegpt": "hessian",
              "sink_sparsegpt": "hessian"}


def plan(args: list[str]) -> int:
    """`sinkprune plan --model CONFIG_OR_HUB_ID --devices 8`: the memory plan from a config.json alone (no weights)."""
    import argparse
    import json

    from pipeline.model import memory_plan as mp

    ap = argparse.ArgumentParser(prog="sinkprune plan", description="The memory plan of a calibration run, from the "
                                 "model's config.json alone (a path, a folder holding it, or a hub id in the local cache).")
    ap.add_argument("--model", required=True)
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--device-memory", default="80GB", help="free memory per device (default 80GB)")
    ap.add_argument("--cpu-memory", default=None, help="CPU memory of a node (default: unbounded)")
    ap.add_argument("--offload", default="auto", choices=("auto", "none", "cpu", "disk"))
    ap.add_argument("--method", default="sink_wanda", choices=tuple(STATISTICS))
    ap.add_argument("--windows", type=int, default=128)
    ap.add_argument("--timesteps", type=int, default=10)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    a = ap.parse_args(args)
    try:
        if a.devices < 1:
            raise ValueError(f"plan --devices {a.devices}: give the number of GPUs, >= 1")
        config = json.loads(Path(_config_file(a.model)).read_text())
        shape = mp.shape_from_config(config, a.model)
        cal = mp.Calibration(statistic=STATISTICS[a.method], windows=a.windows, timesteps=a.timesteps, seqlen=a.seqlen,
                             batch_size=a.batch_size)
        result = mp.memory_plan(shape, cal, device_free=_plan_size("--device-memory", a.device_memory), devices=a.devices,
                                cpu_free=None if a.cpu_memory is None else _plan_size("--cpu-memory", a.cpu_memory),
                                offload=a.offload)
        if result["fix"]:  # printed here: name plan's own flags, not the fit options
            result["fix"] = plan_flags(result["fix"])
    except (ValueError, FileNotFoundError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1) if a.json else mp.render_plan(result))
    return 0 if result["fits"] else 1


def plan_flags(fix: str) -> str:
    """A plan's fix clause with the fit options it names replaced by plan's own flags."""
    for option, flag in (("data.init_args.batch_size", "--batch-size"), ("data.init_args.seqlen", "--seqlen"),
                         ("trainer.devices", "--devices"), ("model.offload: ", "--offload ")):
        fix = fix.replace(option, flag)
    return fix


def _config_file(model: str) -> str:
    """A config.json path, a folder holding one (configs/... also among the package's configs), an embedded model
    name (resolved as loading does), or a hub id whose config.json is in the local Hugging Face cache."""
    from pipeline.model.loading import EMBEDDED, resolve_path

    if model in EMBEDDED:
        return str(Path(resolve_path(model)) / "config.json")
    path = Path(model).expanduser()
    if not path.exists() and path.parts[:1] == ("configs",):
        path = CONFIG_DIR.joinpath(*path.parts[1:])  # the help's example, from any working directory
    if path.is_file():
        return str(path)
    if (path / "config.json").is_file():
        return str(path / "config.json")
    if model.count("/") == 1 and not path.exists():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "config.json")
        if isinstance(cached, str):
            return cached
    if model.startswith((".", "/", "~")) or model.endswith(".json") or path.exists():
        raise FileNotFoundError(f"plan --model {model}: no such config.json (nor a folder holding one); give the path "
                                "of the model's config.json")
    if model.count("/") != 1:
        raise FileNotFoundError(f"plan --model {model}: not an embedded model, a local folder or a hub id; give one "
                                f"of {', '.join(EMBEDDED)}, a folder holding config.json, or its path")
    raise FileNotFoundError(f"plan --model {model}: not in the local Hugging Face cache (offline); fetch its config "
                            f"(huggingface-cli download {model} config.json) or give the path of its config.json")


def _plan_size(flag: str, text: str) -> int:
    """A plan --*-memory size; a bare number below 1 MiB is a forgotten unit (80 means 80GB, not 80 bytes)."""
    from pipeline.model.memory_plan import parse_bytes

    try:
        size = parse_bytes(text)
    except ValueError as exc:
        raise ValueError(f"plan {flag} {text}: {exc}") from None
    if size < 2**20 and text.strip().replace(".", "", 1).isdigit():
        raise ValueError(f"plan {flag} {text}: {size} bytes (a bare number is bytes); give a unit, e.g. {text.strip()}GB")
    return size


if __name__ == "__main__":
    main()
