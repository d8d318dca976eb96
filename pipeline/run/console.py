"""A quiet console: library noise goes to <run folder>/run.log, progress bars for long phases, phase timings.

    quiet_libraries(seed=0)           # before the Trainer exists: Lightning's / lm-eval's / transformers' chatter off
    log_to_run_folder("runs/x")       # warnings and library log records from now on land in runs/x/run.log
    for batch in track(loader, "scoring the dense model", total=len(loader)): ...
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

# Messages no user can act on (library tips, deprecations inside libraries, expected states of this pipeline).
NOISE = (
    r".*No seed found, seed set to.*",
    r".*litlogger.*",
    r".*configure_optimizers.*returned `None`.*",
    r".*LeafSpec.*",
    r".*module\(s\) in eval mode.*",
    r".*modules? in eval mode.*",
    r".*pooler.*",
    r".*Custom kwargs can be passed.*",
    r".*Overwriting default num_fewshot.*",
    r".*requested but CUDA is not available.*",
    r".*does not have many workers.*",
    r".*GPU available.*|.*TPU available.*|.*HPU available.*",
    r".*Seed set to.*",
)
NOISY_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning",
                 "lm_eval", "lm-eval", "lm_eval.evaluator", "lm_eval.api.task", "lm_eval.tasks",
                 "lm_eval.models.huggingface", "transformers", "datasets", "filelock", "urllib3",
                 "pipeline.evaluation.harness")
_log_handler: list[logging.Handler] = []
_timings: dict[str, float] = {}


def quiet_warnings() -> None:
    """The known library warnings off (stdlib only: safe before any heavy import)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")  # lm-eval's request-building bars; ours are rich
    if _log_handler:
        return  # everything goes to run.log already
    for pattern in NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def quiet_libraries(seed: int | None = 0) -> None:
    """Silence library chatter at its source; warnings still reach run.log once log_to_run_folder is called."""
    quiet_warnings()
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.ERROR)
        logger.propagate = bool(_log_handler)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except Exception:
        pass
    if seed is not None:
        from lightning.fabric.utilities.seed import seed_everything

        level = logging.getLogger("lightning.fabric.utilities.seed").level
        logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.ERROR)
        seed_everything(seed, workers=True, verbose=False)
        logging.getLogger("lightning.fabric.utilities.seed").setLevel(level or logging.ERROR)


def close_run_log() -> None:
    """Stop writing run.log (a refused run's folder is about to go)."""
    while _log_handler:
        handler = _log_handler.pop()
        for name in (*NOISY_LOGGERS, "py.warnings"):
            logger = logging.getLogger(name)
            if handler in logger.handlers:
                logger.removeHandler(handler)
        handler.close()


def log_to_run_folder(root: str | Path) -> Path | None:
    """Library warnings and log records (INFO and up) to <root>/run.log, not the console."""
    target = (Path(root) / "run.log").resolve()
    if _log_handler and Path(_log_handler[-1].baseFilename) == target:
        return target
    close_run_log()  # an earlier run in this process: its run.log is closed
    try:
        Path(root).mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(Path(root) / "run.log", mode="w", encoding="utf-8")
    except OSError:
        return None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    _log_handler.append(handler)
    logging.captureWarnings(True)
    warnings.resetwarnings()  # every warning is recorded in run.log ...
    warnings.simplefilter("default")
    wlog = logging.getLogger("py.warnings")
    wlog.handlers, wlog.propagate = [handler], False  # ... and none reaches the console
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.handlers = [h for h in logger.handlers if not isinstance(h, logging.StreamHandler) or isinstance(h, logging.FileHandler)]
        logger.addHandler(handler)
        logger.propagate = False
    return Path(handler.baseFilename)


def _console():
    from rich.console import Console

    return Console(stderr=True)


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def progress_seconds() -> float:
    """SINKPRUNE_PROGRESS_SECONDS: the most seconds between two plain progress lines (default 30, 0: every update)."""
    value = os.environ.get("SINKPRUNE_PROGRESS_SECONDS", "").strip() or "30"
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise ValueError(f"SINKPRUNE_PROGRESS_SECONDS={value!r} is not a number of seconds >= 0; set e.g. 30, or 0 "
                         "for a line at every update")
    return seconds


class LineProgress:
    """Progress as plain lines for a console that is not a terminal (a batch job's log file), where rich's live
    bar would show nothing until the phase ends: a line when a task starts, then at most one every
    SINKPRUNE_PROGRESS_SECONDS (default 30; 0 = every update) with done/total, elapsed time and ETA, and one at the end
    ("calibration: 4/8 windows × timesteps in 0:00:12, ETA 0:00:12").
    The subset of rich.progress.Progress that this package calls."""

    def __init__(self, console, unit: str = ""):
        self.console, self.unit = console, unit
        self.every = progress_seconds()
        self._tasks: list[dict] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        pass

    def add_task(self, description: str, total: int | None = None) -> int:
        now = time.time()
        self._tasks.append({"description": description, "total": total, "completed": 0, "start": now, "said": now,
                            "open": True})
        self._say(self._tasks[-1], final=False)
        return len(self._tasks) - 1

    def advance(self, task: int, advance: int = 1) -> None:
        self.update(task, completed=self._tasks[task]["completed"] + advance)

    def update(self, task: int, completed: int) -> None:
        state = self._tasks[task]
        state["completed"] = completed
        if time.time() - state["said"] >= self.every:
            self._say(state, final=False)

    def stop(self) -> None:
        for state in self._tasks:
            if state["open"]:
                self._say(state, final=True)
                state["open"] = False

    def _say(self, state: dict, final: bool) -> None:
        state["said"] = now = time.time()
        done, total, elapsed = state["completed"], state["total"], now - state["start"]
        count = f"{done}/{total} {self.unit}" if total is not None else f"{done} {self.unit}" if done else ""
        line = f"{state['description']}: " + (f"{count.rstrip()} in {_clock(elapsed)}" if count else _clock(elapsed))
        if final:
            line += ", done"
        elif total and done:
            line += f", ETA {_clock(elapsed / done * (total - done))}"
        self.console.print(line, markup=False, highlight=False, emoji=False)  # longer than the console: wrapped


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress_display(*columns, unit: str = "", transient: bool = False):
    """A rich live Progress with `columns` on a terminal; LineProgress (plain lines) when stderr is a file or pipe."""
    from rich.progress import Progress

    console = _console()
    if not console.is_terminal:
        return LineProgress(console, unit)
    return Progress(*columns, console=console, transient=transient)


def track(iterable, description: str, total: int | None = None, unit: str = "items", record: bool = True):
    """A progress bar (phase, items, elapsed, ETA) on rank zero; the phase's time goes to phase_timings()
    unless record=False (the caller records it)."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    start = time.time()
    if total is None:
        try:
            total = len(iterable)
        except TypeError:
            total = None
    if not is_rank_zero():
        yield from iterable
        return
    columns = (TextColumn("{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn(), TextColumn(unit),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with progress_display(*columns, unit=unit) as progress:
        task = progress.add_task(description, total=total)
        for item in iterable:
            yield item
            progress.advance(task)
    if record:
        record_time(description, time.time() - start)


@contextmanager
def status(message: str, when=lambda: True):
    """A spinner with `message` and the elapsed time on rank zero while a step without countable items runs
    (only if when()); plain start and end lines when the console is not a terminal."""
    if not is_rank_zero() or not when():
        yield
        return
    from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn

    with progress_display(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                          transient=True) as progress:
        progress.add_task(message, total=None)
        yield


def record_time(name: str, seconds: float) -> None:
    _timings[name] = _timings.get(name, 0.0) + seconds


def phase_timings() -> dict[str, float]:
    return dict(_timings)


def reset_timings() -> None:
    _timings.clear()


def render_timings(timings: dict[str, float]):
    from rich.table import Table

    table = Table(title="where the time went", min_width=40)
    table.add_column("phase")
    table.add_column("seconds", justify="right")
    for name, seconds in timings.items():
        table.add_row(name, f"{seconds:.1f}")
    return table


def ordered_phases(tracked: dict, timings: dict) -> dict:
    """Phase -> seconds in run order: merge, dense scoring, calibration, pruned scoring (saving added later)."""
    order = [k for k in tracked if k.startswith("merging")] + [k for k in tracked if k.startswith("dense:")]
    out = {k: tracked[k] for k in order}
    if timings.get("dense_cached"):
        out["dense: from the cache"] = 0.0
    out["calibration + pruning"] = timings.get("calibration_s", 0.0)
    out.update({k: v for k, v in tracked.items() if k not in out})
    return out
