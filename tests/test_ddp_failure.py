"""One failing rank of a 2-process run (calibration_ddp_spawn, gloo on CPU) stops the whole run: `cli.py fit`
exits non-zero within a bound, prints one error line that names the rank and its error, leaves no output
directory and no rank process behind."""
import os
import signal
import subprocess
import sys
import time
import traceback

import pytest
import yaml
from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

import cli
from tests.faults import FailOnRank, InjectedFailure
from tests.runs import REPO, tiny_config

TIMEOUT_S = 300      # the whole command; a hang is killed (with its ranks) and fails the test
STOP_WITHIN_S = 60   # from the injected failure to the command's exit


def _run_cli_session(config, tmp_path):
    """`cli.py fit` in its own session, so that on a timeout the command and every rank it spawned are killed."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("SINKPRUNE_TRACEBACK", None)
    proc = subprocess.Popen([sys.executable, "cli.py", "fit", "--config", str(path)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"cli.py fit was still running {TIMEOUT_S} s after its start: the failed rank hung the run\n{err[-3000:]}")
    return proc, out, err, time.time()


def _group_alive(pgid) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("mode,hook,expected", [
    # rank 1 raises at the end of the epoch while rank 0 waits for it in SinkStatsCallback's all_gather
    ("raise", "on_train_epoch_end", "error: rank 1: injected failure on rank 1 in on_train_epoch_end"),
    # rank 1 dies without a word at its first batch (as a segfault or the OOM killer would end it)
    ("exit", "on_train_batch_start", "error: rank 1: terminated with exit code 3"),
], ids=["raises-during-collective", "dies-at-first-batch"])
def test_failing_rank_stops_the_run(tmp_path, mode, hook, expected):
    root = tmp_path / "run"
    config = tiny_config(root, nsamples=4, model_args={"score_dense": False}, prune_args={"score": False},
                         trainer_args={"devices": 2, "strategy": "calibration_ddp_spawn"})
    fault = {"class_path": "tests.faults.FailOnRank", "init_args": {"rank": 1, "hook": hook, "mode": mode}}
    config["trainer"]["callbacks"].insert(0, fault)  # before SinkStatsCallback: its epoch-end gather waits for rank 1
    proc, out, err, ended = _run_cli_session(config, tmp_path)

    assert proc.returncode == 2, f"exit {proc.returncode}\n{err[-3000:]}"
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(expected), err[-3000:]
    assert "Traceback" not in err, err[-3000:]  # one line, not the launcher's traceback
    stamps = [float(line.split()[1]) for line in err.splitlines() if line.startswith(FailOnRank.STAMP)]
    assert len(stamps) == 1, err[-3000:]  # the fault fired once, on rank 1 only
    assert ended - stamps[0] < STOP_WITHIN_S, f"the run took {ended - stamps[0]:.0f} s to stop after the failure"
    assert not (root / "pruned").exists() and not (root / "sinks").exists()
    assert not list(root.glob(".*tmp*")) if root.exists() else True
    deadline = time.time() + 15  # spawned ranks (and multiprocessing's helper) are gone, not orphaned
    while _group_alive(proc.pid) and time.time() < deadline:
        time.sleep(0.5)
    if _group_alive(proc.pid):
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("processes of the failed run were still alive 15 s after it exited")


def _traceback_text(exc: BaseException) -> str:
    try:
        raise exc
    except BaseException:  # noqa: BLE001
        return "\n\n-- Process 1 terminated with the following error:\n" + traceback.format_exc()


def test_rank_error_reads_the_child_traceback():
    """The one-line report of a spawned rank's error, from the traceback text torch hands back."""
    clean = ProcessRaisedException(_traceback_text(InjectedFailure("boom\nsecond line")), 1, 123)
    assert cli.rank_error(clean) == ("tests.faults.InjectedFailure", "boom", True)
    nan = ProcessRaisedException(_traceback_text(FloatingPointError("NaN/Inf in x")), 0, 123)
    assert cli.rank_error(nan) == ("FloatingPointError", "NaN/Inf in x", True)
    try:  # a chained error: the outermost exception is reported
        try:
            raise ValueError("inner")
        except ValueError as inner:
            raise KeyError("outer") from inner
    except KeyError:
        chained = ProcessRaisedException("\n\n-- Process 1 terminated:\n" + traceback.format_exc(), 1, 123)
    assert cli.rank_error(chained) == ("KeyError", "'outer'", False)  # not a clean error: the traceback is shown
    exited = ProcessExitedException("process 1 terminated with signal SIGKILL", 1, 123, -9, "SIGKILL")
    kind, message, is_clean = cli.rank_error(exited)
    assert message.startswith("terminated with signal SIGKILL") and is_clean
