"""Every command and code block in README.md runs as written.

Shell commands run in a fresh folder, in README order (the lm-eval command reads the first run's model);
commands marked "tested with --print_config" (a GPU or a long run) are parsed with --print_config instead;
`pip install ... && X` runs X; the test-suite command is .ci/run's, verbatim.  Python blocks run as scripts."""
from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys

import yaml

import cli
from tests.runs import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")
MARK = "tested with --print_config"
TEST_COMMAND = 'pip install torch==2.13.0 -e ".[test]" && HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m pytest tests'


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, re.S | re.M)


def commands() -> list[str]:
    """The README's shell commands, continuation lines joined, in order."""
    out = []
    for block in blocks("bash"):
        out += [c for c in block.replace("\\\n", " ").splitlines() if c.strip() and not c.lstrip().startswith("#")]
    return out


def argv_of(command: str) -> tuple[list[str], dict]:
    """(argv, environment assignments) of a README command, after `pip install ... &&` and a torchrun launcher."""
    if command.startswith("pip install"):
        command = command.partition("&&")[2]
    argv = shlex.split(command, comments=True)
    env = {}
    while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):
        key, _, value = argv.pop(0).partition("=")
        env[key] = value
    if argv[0] == "torchrun":
        argv = ["python", *argv[argv.index("cli.py"):]]
    return argv, env


def _in_process(args: list[str]) -> tuple[int, str, str]:
    """`python cli.py ARGS` in this process: (exit code, stdout, stderr)."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def _subprocess(argv: list[str], env: dict, cwd) -> subprocess.CompletedProcess:
    """From `cwd`, with the repository's scripts and config folders named by their place in the repository."""
    fixed = [sys.executable if i == 0 and a == "python" else
             str(REPO / a) if (a.endswith(".py") or a.startswith("configs/")) and (REPO / a).exists() else a
             for i, a in enumerate(argv)]
    environ = dict(os.environ, **env, COLUMNS="80", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(fixed, cwd=cwd, env=environ, capture_output=True, text=True, timeout=900)


def test_readme_opens_with_the_run_and_the_tests_and_stays_a_guide():
    first, second = blocks("bash")[0].splitlines()[:2]
    assert first == 'pip install torch==2.13.0 -e ".[test]" && python cli.py fit --config configs/tiny_sink50.yaml'
    assert second == TEST_COMMAND
    assert TEST_COMMAND in (REPO / ".ci" / "run").read_text().splitlines()  # CI runs the README's command verbatim
    assert len(README.splitlines()) <= 400
    for page in re.findall(r"\]\((docs/[\w./-]+)\)", README):
        assert (REPO / page).is_file(), page


def test_readme_commands_run_as_written(tmp_path):
    ran = []
    for command in commands():
        if command == TEST_COMMAND:
            continue  # this suite; CI runs it (test above)
        argv, env = argv_of(command)
        marked = MARK in command
        assert not marked or argv[:2] == ["python", "cli.py"], command
        if argv[:2] == ["python", "cli.py"] and (marked or "--print_config" in argv or "--help" in argv):
            code, out, err = _in_process(argv[2:] + (["--print_config"] if marked else []))
            assert code == 0, f"{command}\n{err[-2000:]}"
            if "--help" not in argv:
                assert yaml.safe_load(out)["trainer"]["callbacks"], command
            ran.append(command)
            continue
        done = _subprocess(argv, env, tmp_path)
        console = done.stdout + done.stderr
        assert done.returncode == 0, f"{command}\n{console[-3000:]}"
        assert "Some weights" not in console and "Traceback" not in console, command
        wide = [line for line in console.splitlines() if len(line) > 80] if argv[1] == "cli.py" else []  # ours, not lm-eval's
        assert not wide, f"{command}: wider than 80 columns:\n" + "\n".join(wide[:5])
        ran.append(command)
    assert (tmp_path / "runs" / "tiny_sink50" / "pruned" / "results.json").is_file()  # the first command's run
    assert len(ran) == len(commands()) - 1


def test_readme_python_blocks_run_as_written(tmp_path):
    for i, code in enumerate(blocks("python")):
        (tmp_path / f"block{i}.py").write_text(code)
        done = _subprocess(["python", str(tmp_path / f"block{i}.py")], {}, tmp_path)
        assert done.returncode == 0, f"README python block {i}:\n{done.stderr[-3000:]}"
    assert (tmp_path / "runs" / "my_project" / "pruned" / "masks.safetensors").is_file()
