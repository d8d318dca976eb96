"""Test setup: offline, one thread, and the embedded models loaded once per session."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def minilm():
    from pipeline.model.loading import load_dlm

    return load_dlm("minilm-dlm")
