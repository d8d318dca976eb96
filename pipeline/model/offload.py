"""Block-by-block onloading: the transformer blocks' weights live in CPU memory ("cpu") or in the checkpoint's
safetensors, memory-mapped ("disk"); the embeddings, the head and every buffer live on the compute device, but for
calibration's block passes (`block_passes`): these run blocks alone, so the head leaves the device for them and the
embeddings once the block inputs are made (pinned CPU copies; buffers stay).

A block is onloaded (its parameters' `.data` pointed at a device copy) while it runs and released after (pointed back
at its CPU copy, the *master*); `release(i, writeback=True)` first copies the device weights into the master, so a
pruned block stays pruned: nothing is ever re-read from the unpruned checkpoint.  The "disk" masters are copy-on-write
views of the file (`mmap.ACCESS_COPY`): pages are read when touched and the checkpoint is never written; a pruned
block is written to a temporary scratch file and mapped back from there, so it too stays out of memory.  On CUDA the masters are pinned and `prefetch(i + 1)` copies the next block on a
side stream while block i runs; on the CPU onloading moves nothing (the CPU is the compute device) but is counted.

Any forward works while blocks are offloaded: a pre-forward hook onloads a block that is not on the device and a
post-forward hook releases it (held-out scoring, the short structural forwards at fit start).  Calibration onloads
each block once, explicitly (callbacks/cached.py).  `peak_bytes` counts the weight bytes on the compute device
(buffers, the weights outside the blocks while there, onloaded and prefetched blocks), the figure the tests bound by
two blocks plus the embeddings and head; `peak_in_passes` the same during the block passes (two blocks, or the
embeddings while the block inputs are made).
"""
from __future__ import annotations

import json
import mmap
import struct
from contextlib import contextmanager
from pathlib import Path

import torch

OFFLOADS = ("auto", "none", "cpu", "disk")

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def mapped_safetensors(folder: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder's *.safetensors as a copy-on-write memory-mapped CPU tensor (no copy;
    writes stay in this process's memory, the files are never modified)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model.offload=disk: {folder} has no *.safetensors file to map; use offload: cpu")
    return map_files(files)


def map_files(files) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        with open(path, "rb") as f:
            header_len = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(header_len))
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        base = 8 + header_len
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            start, end = meta["data_offsets"]
            dtype = _SAFETENSORS_DTYPES[meta["dtype"]]
            flat = torch.frombuffer(mapped, dtype=dtype, count=(end - start) // torch.empty((), dtype=dtype).element_size(),
                                    offset=base + start) if end > start else torch.empty(0, dtype=dtype, device="cpu")
            tensors[name] = flat.view(meta["shape"])
    return tensors


class BlockOffloader:
    """Keeps the blocks of `model` off the compute device and onloads them one (two, while prefetching) at a time."""

    def __init__(self, model: torch.nn.Module, blocks: list[torch.nn.Module], device, mode: str = "cpu",
                 checkpoint: str | None = None):
        if mode not in ("cpu", "disk"):
            raise ValueError(f"model.offload={mode!r}: the offloader keeps blocks on 'cpu' or 'disk'")
        self.device, self.mode, self.blocks = torch.device(device), mode, list(blocks)
        mapped = mapped_safetensors(checkpoint) if mode == "disk" else {}
        self._scratch = None  # disk: a temporary folder the pruned blocks are written to and mapped back from
        full_names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        pin = self.device.type == "cuda"
        self.params: list[list[tuple[torch.nn.Parameter, torch.Tensor]]] = []
        seen: set[int] = set()
        with torch.no_grad():
            for block in self.blocks:
                entries = []
                for p in block.parameters():
                    if id(p) in seen:
                        continue
                    seen.add(id(p))
                    master = self._master(p, full_names.get(id(p), "?"), mapped, pin)
                    p.data = master
                    entries.append((p, master))
                self.params.append(entries)
                for b in block.buffers():  # RoPE tables and the like: small, kept on the device
                    b.data = b.data.to(self.device)
                block._apply = lambda fn, recurse=True, block=block: block  # Lightning's .to(device) skips the block
        self.block_bytes = [tensor_bytes(m for _, m in entries) for entries in self.params]
        offloaded = {id(p) for entries in self.params for p, _ in entries}
        self.ignored_names = [n for n, p in model.named_parameters() if id(p) in offloaded]  # not broadcast by DDP
        # the other weights (embeddings, head, final norm) stay on the device but for the block passes (block_passes)
        self.outer: list[list] = [[p, None] for p in model.parameters() if id(p) not in offloaded]  # [param, CPU master]
        self.head_ids = _untied_head(model)
        self.buffer_bytes = tensor_bytes(model.buffers())
        self.outer_bytes = tensor_bytes(p for p, _ in self.outer)
        self.head_bytes = tensor_bytes(p for p, _ in self.outer if id(p) in self.head_ids)
        self.resident_bytes = self.outer_bytes + self.buffer_bytes  # (embeddings and head: resident outside the passes)
        self.outer_on_device = self.outer_bytes
        self.in_passes, self.peak_in_passes, self.peak_outer_in_passes = False, 0, 0
        self.loaded: dict[int, bool] = {}     # block index -> onloaded by a forward hook (released by the hook)
        self.prefetched: dict[int, tuple] = {}
        self.onloaded_bytes = self.peak_bytes = 0
        self.park_inputs = True  # cached block inputs wait in pinned CPU memory (DLMModule: False when they fit beside)
        self.onloads = 0
        self._stream = None
        self._handles = [h for i, block in enumerate(self.blocks) for h in (
            block.register_forward_pre_hook(lambda m, args, i=i: self._hook_onload(i)),
            block.register_forward_hook(lambda m, args, out, i=i: self._hook_release(i)))]

    def _master(self, p: torch.nn.Parameter, name: str, mapped: dict, pin: bool) -> torch.Tensor:
        if self.mode == "disk":
            key = next((k for k in (name, name.removeprefix("model.")) if k in mapped), None)
            if key is None or tuple(mapped[key].shape) != tuple(p.shape):
                raise ValueError(f"model.offload=disk: the checkpoint has no tensor {name} of shape {tuple(p.shape)} (the "
                                 "model converts its weights on loading); use offload: cpu")
            if mapped[key].dtype != p.dtype:
                raise ValueError(f"model.offload=disk: {name} is {mapped[key].dtype} in the checkpoint but {p.dtype} in the "
                                 "model; set model.torch_dtype to the checkpoint's dtype or use offload: cpu")
            return mapped[key]
        master = p.data.to("cpu")
        return master.pin_memory() if pin else master

    # --- counting ---------------------------------------------------------------------------------------------
    @property
    def device_bytes(self) -> int:
        return self.buffer_bytes + self.outer_on_device + self.onloaded_bytes

    def _count(self, delta: int = 0) -> None:
        self.onloaded_bytes += delta
        self.peak_bytes = max(self.peak_bytes, self.device_bytes)
        if self.in_passes:
            self.peak_in_passes = max(self.peak_in_passes, self.device_bytes)
            self.peak_outer_in_passes = max(self.peak_outer_in_passes, self.outer_on_device)

    # --- the weights outside the blocks -----------------------------------------------------------------------
    @contextmanager
    def block_passes(self):
        """The block-by-block passes of calibration: the output head leaves the device for their whole length (no
        pass runs it), the other weights outside the blocks stay only while the block inputs are made
        (`outer_on("inputs")`, then `outer_on("none")`); all of them are back on the device afterwards."""
        self.release_all()  # (a forward stopped inside a block at fit start may have left it, and the next, here)
        self.in_passes = True
        self.outer_on("inputs")
        try:
            yield
        finally:
            self.in_passes = False
            self.outer_on("all")

    def outer_on(self, which: str) -> None:
        """Which weights outside the blocks are on the device: "all", "inputs" (all but an untied output head: what
        a forward needs before the first block) or "none".  Never modified by pruning, they are copied to their CPU
        masters (pinned, made once) when they leave, and back when they return."""
        with torch.no_grad():
            for entry in self.outer:
                p, master = entry
                wanted = which == "all" or (which == "inputs" and id(p) not in self.head_ids)
                there = p.data.device.type != "cpu" if self.device.type != "cpu" else master is None
                if wanted == there:
                    continue
                if self.device.type == "cpu":  # the CPU computes: nothing moves, the bytes are counted
                    entry[1] = None if wanted else p.data
                elif wanted:  # (no master: a weight that never reached the device goes there now)
                    p.data = (master if master is not None else p.data).to(self.device, non_blocking=True)
                else:
                    if master is None:
                        master = entry[1] = torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=True)
                    master.copy_(p.data)
                    p.data = master
                self.outer_on_device += (1 if wanted else -1) * p.numel() * p.element_size()
        self._count()

    # --- moving -----------------------------------------------------------------------------------------------
    def prefetch(self, i: int) -> None:
        """Start copying block i to the device on a side stream (CUDA; a no-op elsewhere)."""
        if self.device.type != "cuda" or not 0 <= i < len(self.blocks) or i in self.loaded or i in self.prefetched:
            return
        self._stream = self._stream or torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._stream):
            copies = [master.to(self.device, non_blocking=True) for _, master in self.params[i]]
            event = torch.cuda.Event()
            event.record(self._stream)
        self.prefetched[i] = (event, copies)
        self._count(self.block_bytes[i])

    def onload(self, i: int, by_hook: bool = False) -> None:
        if i in self.loaded:  # an explicit onload takes over a block a hook brought (the hook will not release it)
            self.loaded[i] = self.loaded[i] and by_hook
            return
        fetched = self.prefetched.pop(i, None)
        if fetched is not None:
            event, copies = fetched
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            for c in copies:
                c.record_stream(stream)
        else:  # (disk on the CPU: a private copy, so that pruning never dirties the mapped checkpoint's pages)
            copy = (lambda m: m.clone()) if self.mode == "disk" and self.device.type == "cpu" else (
                lambda m: m.to(self.device, non_blocking=True))
            copies = [copy(master) for _, master in self.params[i]]
            self._count(self.block_bytes[i])
        for (p, _), copy in zip(self.params[i], copies):
            p.data = copy
        self.loaded[i] = by_hook
        self.onloads += 1

    def release(self, i: int, writeback: bool = False) -> None:
        """Point block i back at its masters; writeback: copy the device weights (pruned, updated) into them first."""
        if self.loaded.pop(i, None) is None:
            return
        if writeback and self.mode == "disk":
            self._spill(i)  # (the new masters hold the weights: nothing to copy)
            writeback = False
        with torch.no_grad():
            for p, master in self.params[i]:
                if writeback and p.data.data_ptr() != master.data_ptr():
                    master.copy_(p.data)
                p.data = master
        self._count(-self.block_bytes[i])

    def _spill(self, i: int) -> None:
        """disk: block i's weights (pruned) into a file of the scratch folder, mapped back as its new masters: they
        stay out of memory like the checkpoint's (a copy-on-write write would keep them as private pages)."""
        import tempfile
        import weakref

        from safetensors.torch import save_file

        if self._scratch is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="sinkprune-offload-")
            weakref.finalize(self, self._scratch.cleanup)
        path = Path(self._scratch.name) / f"block_{i}.safetensors"
        save_file({str(k): p.data.detach().to("cpu").contiguous() for k, (p, _) in enumerate(self.params[i])}, str(path))
        mapped = map_files([path])
        self.params[i] = [(p, mapped[str(k)]) for k, (p, _) in enumerate(self.params[i])]

    def release_all(self) -> None:
        for i in list(self.loaded):
            self.release(i)
        for i in list(self.prefetched):
            self.prefetched.pop(i)
            self._count(-self.block_bytes[i])

    def close(self) -> None:
        """Release every block and remove the hooks: the model's blocks stay on their masters, unmanaged."""
        self.release_all()
        for h in self._handles:
            h.remove()
        self._handles = []
        for block in self.blocks:
            block.__dict__.pop("_apply", None)

    def _hook_onload(self, i: int) -> None:
        for j in [j for j, by_hook in self.loaded.items() if by_hook and j != i]:  # a forward stopped inside it
            self.release(j)
        if i not in self.loaded:
            self.onload(i, by_hook=True)
            self.prefetch(i + 1)

    def _hook_release(self, i: int) -> None:
        if self.loaded.get(i):
            self.release(i)

    def report(self) -> dict:
        return {"mode": self.mode, "blocks": len(self.blocks), "block_inputs_on": "cpu" if self.park_inputs else "device",
                "block_bytes": max(self.block_bytes, default=0), "resident_bytes": self.resident_bytes,
                "buffer_bytes": self.buffer_bytes, "head_bytes": self.head_bytes,
                "peak_weight_bytes_on_device": self.peak_bytes, "peak_weight_bytes_in_passes": self.peak_in_passes,
                "peak_outer_bytes_in_passes": self.peak_outer_in_passes, "onloads": self.onloads}


def _untied_head(model: torch.nn.Module) -> set[int]:
    """ids of the output head's parameters, unless they are the input embedding's too (tied)."""
    get_head, get_embedding = (getattr(model, k, None) for k in ("get_output_embeddings", "get_input_embeddings"))
    head = get_head() if callable(get_head) else None
    if head is None:
        return set()
    embedding = get_embedding() if callable(get_embedding) else None
    tied = {id(p) for p in embedding.parameters()} if embedding is not None else set()
    return {id(p) for p in head.parameters()} - tied
