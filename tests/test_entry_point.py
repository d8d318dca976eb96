"""The `dlm` lm-eval model is published as an entry point (group `lm_eval.models`)."""
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def test_pyproject_declares_the_dlm_entry_point():
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    assert project["entry-points"]["lm_eval.models"] == {"dlm": "pipeline.evaluation.harness:DiffusionLM"}


def test_installed_metadata_has_it_and_it_loads():
    """Reads the installed package's metadata: passes once the package is (re)installed from this tree."""
    from pipeline.evaluation.harness import DiffusionLM

    found = {ep.name: ep for ep in entry_points(group="lm_eval.models")}
    assert "dlm" in found, "no `dlm` in entry points group lm_eval.models: reinstall the package (pip install -e .)"
    assert found["dlm"].value == "pipeline.evaluation.harness:DiffusionLM"
    assert found["dlm"].load() is DiffusionLM
