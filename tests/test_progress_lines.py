"""Progress in a batch log: with stderr going to a file, every long phase prints plain lines while it runs."""
from __future__ import annotations

import re
import subprocess

from tests.runs import REPO, cli_command, tiny_config


def test_calibration_progress_is_plain_lines_in_a_log_file(tmp_path):
    config = tiny_config(tmp_path, pretrained="tiny-llada", nsamples=4, seqlen=32, timesteps=2, batch_size=1,
                         prune_args={"save_model": False, "score": False, "score_dense": False})
    argv, env = cli_command(config, tmp_path)
    env["SINKPRUNE_PROGRESS_SECONDS"] = "0"
    log = tmp_path / "ck.err"
    with log.open("w") as err:
        done = subprocess.run(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err, timeout=600)
    text = log.read_text()
    assert done.returncode == 0, text[-2000:]
    assert "\x1b[" not in text and "\r" not in text
    calibration = [line for line in text.splitlines() if line.startswith("calibration: ")]
    # a start line, one per batch of 1 window x 2 timesteps, and the closing line
    counts = [re.search(r"(\d+)/8 windows × timesteps", line).group(1) for line in calibration]
    assert counts == ["0", "2", "4", "6", "8", "8"], calibration
    assert all(re.search(r" in \d+:\d\d:\d\d", line) for line in calibration)
    assert all("ETA " in line for line in calibration[1:-2]) and calibration[-1].endswith(", done")


def test_line_progress_speaks_at_the_start_every_interval_and_the_end(monkeypatch):
    """Default interval (30 s): a phase shorter than that prints its start and end lines only; a bad value is
    one line naming the variable."""
    import io

    import pytest
    from rich.console import Console

    from pipeline.run.console import LineProgress

    monkeypatch.delenv("SINKPRUNE_PROGRESS_SECONDS", raising=False)
    out = io.StringIO()
    with LineProgress(Console(file=out, width=80), unit="batches") as progress:
        task = progress.add_task("dense: held-out text", total=5)
        for _ in range(5):
            progress.advance(task)
    lines = out.getvalue().splitlines()
    assert [line.split(" in ")[0] for line in lines] == ["dense: held-out text: 0/5 batches",
                                                         "dense: held-out text: 5/5 batches"], lines
    assert lines[-1].endswith(", done")
    monkeypatch.setenv("SINKPRUNE_PROGRESS_SECONDS", "soon")
    with pytest.raises(ValueError, match=r"^SINKPRUNE_PROGRESS_SECONDS='soon' is not a number of seconds >= 0"):
        LineProgress(Console(file=io.StringIO()))
