"""sinkprune's library, in layers: maths (pure tensors) < run (outputs, phase, strategy) < model < evaluation.

Nothing here imports upward, and nothing imports `callbacks/` (which sits above all of it).

`_LEGACY` keeps the pre-layering names that the zoo's MiniLM training and report scripts still import
(`pipeline.data`, `pipeline.sinks`, ...): each is the very module object of its new home, imported only
when asked for.  Drop an entry once no script uses its old name.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

_LEGACY = {
    "pipeline.attention": "pipeline.maths.attention",
    "pipeline.corpus": "pipeline.model.corpus",
    "pipeline.data": "pipeline.model.data",
    "pipeline.diffusion": "pipeline.maths.diffusion",
    "pipeline.loading": "pipeline.model.loading",
    "pipeline.sinks": "pipeline.maths.sinks",
}


class _LegacyNames(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in _LEGACY else None

    def create_module(self, spec):
        module = importlib.import_module(_LEGACY[spec.name])
        spec.loader_state = module.__spec__  # the import system stamps the alias spec on it next
        return module

    def exec_module(self, module):
        module.__spec__ = module.__spec__.loader_state


if not any(isinstance(finder, _LegacyNames) for finder in sys.meta_path):
    sys.meta_path.insert(0, _LegacyNames())
