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
    assert all("elapsed " in line for line in calibration)
    assert all("ETA " in line for line in calibration[1:-2]) and calibration[-1].endswith(", done")
