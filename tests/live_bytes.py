"""Bytes of CPU tensors alive, counted op by op: the CPU's stand-in for `torch.cuda.max_memory_allocated`.

    with LiveBytes() as count:
        work()
    count.peak        # the most bytes that tensors made inside the block held at once

Every aten op's fresh outputs (a return without alias annotation: not a view, not in place) are counted from the op
that makes them until the last tensor sharing their storage is gone (views made later join their base's count).
Tensors that existed before the block (weights) are not counted; `extra()` adds a figure kept elsewhere at each op
(the offloader's count of weight bytes on the device, minus tensors that would live in CPU memory on a GPU).
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LiveBytes(TorchDispatchMode):
    def __init__(self, extra=lambda: 0):
        super().__init__()
        self.extra = extra
        self.storages: dict[int, list] = {}  # storage address -> [bytes, tensors alive on it, their weak references]
        self.live = self.peak = 0

    def _gone(self, key: int) -> None:
        entry = self.storages.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.live -= self.storages.pop(key)[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        for ret, t in zip(func._schema.returns, outputs):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.untyped_storage().data_ptr() == 0:
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key not in self.storages:
                if ret.alias_info is not None:
                    continue  # a view of a tensor made before the count (a weight)
                self.storages[key] = [storage.nbytes(), 0, []]
                self.live += storage.nbytes()
            entry = self.storages[key]
            entry[1] += 1
            entry[2].append(weakref.ref(t, lambda _, key=key: self._gone(key)))
        self.peak = max(self.peak, self.live + self.extra())
        return out
