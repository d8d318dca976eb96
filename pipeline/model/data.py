"""CalibrationData: text -> token windows for calibration, plus a held-out split for scoring.

Sources: `wiki-embedded` (real Wikipedia from gensim's wheel, offline; the default), the hub datasets the
reference uses (`wikitext2`, `c4`), or local files (.txt, .json/.jsonl with a "text" field, .parquet).
Calibration windows are random `seqlen` slices of the concatenated token stream, chosen by `seed`, as in
Wanda/SparseGPT.  Held-out windows are spread evenly over the held-out stream without overlap, so scoring is deterministic.
"""
from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

HUB_SOURCES = {
    "wikitext2": dict(path="wikitext", name="wikitext-2-raw-v1", train="train", heldout="test", field="text"),
    "c4": dict(
        path="allenai/c4",
        name=None,
        train="train",
        heldout="validation",
        field="text",
        data_files={"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"},
    ),
}


def load_texts(source: str, split: str) -> list[str]:
    """Documents of one split ('train' or 'heldout') of a named source or local file(s)."""
    if source == "wiki-embedded":
        from pipeline.model.corpus import wiki_split

        return wiki_split(split)
    if source in HUB_SOURCES:
        from datasets import load_dataset

        spec = HUB_SOURCES[source]
        kwargs = {"data_files": spec["data_files"]} if "data_files" in spec else {}
        try:
            ds = load_dataset(spec["path"], spec["name"], split=spec[split], **kwargs)
        except ConnectionError as exc:  # offline (HF_DATASETS_OFFLINE=1) or the Hub unreachable, and not cached
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConnectionError(f"data.dataset={source}: {first}; run once with network access to cache it, or use "
                                  "wiki-embedded or a local text/JSON file") from None
        if source == "wikitext2":  # the reference joins wikitext lines into one document
            return ["\n\n".join(ds[spec["field"]])]
        return list(ds[spec["field"]][:20000])
    return _local_texts(source, split)


def _check_local_files(source: str) -> list[Path]:
    paths = [Path(p).expanduser() for p in source.split(",")]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(
                f"data.dataset: {str(p)!r} is neither a file nor a known source; use wiki-embedded, "
                f"wikitext2, c4 or an existing .txt/.json/.jsonl/.parquet file"
            )
    return paths


def _local_texts(source: str, split: str) -> list[str]:
    """Local files: 'train.txt' or 'train.txt,heldout.txt'.  With one file, the last 10% of documents is held out."""
    paths = _check_local_files(source)
    if len(paths) == 2:
        return _read_documents(paths[0 if split == "train" else 1])
    docs = _read_documents(paths[0])
    cut = max(1, int(len(docs) * 0.9)) if len(docs) > 1 else len(docs)
    return docs[:cut] if split == "train" else docs[cut:] or docs[-1:]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"data.dataset: {path} is not UTF-8 text (byte offset {exc.start}); give a UTF-8 "
                         ".txt/.json/.jsonl file or a .parquet file") from None


def _json_records(path: Path) -> list:
    """A JSON array of records, or JSON lines (one record per line); errors name the line."""
    text = _read_text(path)
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"data.dataset: {path} line {exc.lineno}: invalid JSON ({exc.msg}); fix that line") from None
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"data.dataset: {path} line {lineno}: invalid JSON ({exc.msg}); "
                                 'each line must be one object like {"text": "..."}') from None
    return records


def _read_documents(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        from datasets import load_dataset

        ds = load_dataset("parquet", data_files=str(path), split="train")
        if "text" not in ds.column_names:
            raise ValueError(f"{path}: no 'text' column (columns: {ds.column_names}); name the text field 'text'")
        return [t for t in ds["text"] if t]
    if suffix in (".json", ".jsonl"):
        records = _json_records(path)
        for i, rec in enumerate(records):
            if not isinstance(rec, dict) or not isinstance(rec.get("text", ""), str) or "text" not in rec:
                raise ValueError(f"data.dataset: {path} record {i + 1} has no string field 'text'; "
                                 'give records like {"text": "..."}')
        return [r["text"] for r in records if r["text"]]
    return [d for d in _read_text(path).split("\n\n") if d.strip()]


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """Documents tokenized without special tokens and joined with the EOS/SEP token when there is one."""
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if sep is not None:
            ids.append(sep)
    return torch.tensor(ids, dtype=torch.long)


def corpus_tokens(tokenizer, source: str, split: str) -> torch.Tensor:
    """token_stream(tokenizer, load_texts(source, split)).  The embedded corpus's streams are kept in
    $SINKPRUNE_CACHE/tokens, keyed by the tokenizer (its full serialisation), the dump file and the code that
    reads it, so a second run skips unpacking and parsing the dump and tokenizing it (seconds on a CPU)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if source != "wiki-embedded" or backend is None:
        return token_stream(tokenizer, load_texts(source, split))
    import hashlib
    import os
    from importlib.metadata import version

    from pipeline.model import corpus
    from pipeline.model.minilm import cache_root

    spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}  # call state
    h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
    for part in (split, corpus.WIKI_DUMP, version("gensim"), str(corpus.HELDOUT_EVERY), str(tokenizer.eos_token_id), str(tokenizer.sep_token_id)):
        h.update(part.encode() + b"\0")
    for code in (Path(corpus.__file__), Path(__file__)):
        h.update(code.read_bytes())
    path = cache_root() / "tokens" / f"{h.hexdigest()[:32]}.pt"
    try:
        return torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError):
        pass
    stream = token_stream(tokenizer, load_texts(source, split))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(stream, tmp)
        tmp.replace(path)
    except OSError:
        pass  # a read-only cache only costs time
    return stream


def prefixed_windows(stream: torch.Tensor, starts: torch.Tensor, body: int, first_id: int | None) -> torch.Tensor:
    """Rows stream[s : s + body], each led by first_id (BOS / [CLS]) when there is one."""
    rows = torch.stack([stream[s : s + body] for s in starts.tolist()]) if len(starts) else torch.empty(0, body, dtype=torch.long)
    if first_id is None:
        return rows
    return torch.cat([torch.full((len(rows), 1), first_id, dtype=torch.long), rows], dim=1)


class WindowDataset(Dataset):
    """Fixed windows; item i carries its global index so noise can be seeded by it (rank-independent)."""

    def __init__(self, windows: torch.Tensor, n_kept: int):
        self.windows, self.n_kept = windows, n_kept

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, i):
        """Indices past the end are DDP padding: a real window, flagged index -1 so nothing counts it."""
        keep = torch.zeros(self.windows.shape[1], dtype=torch.bool)
        keep[: self.n_kept] = True
        n = len(self.windows)
        return {"input_ids": self.windows[i % n], "keep": keep, "index": i if i < n else -1}


class UnpaddedDistributedSampler(DistributedSampler):
    """Rank r gets indices r, r+W, r+2W, …: disjoint, nothing duplicated or dropped.

    Every rank must run the same number of steps (Lightning synchronises each one), so short shards are
    filled with indices past the dataset's end, which WindowDataset flags as padding (index -1) and the
    callbacks and metrics ignore.  torch's DistributedSampler pads with real repeats instead, which would
    count some windows twice.  Subclassing it keeps Lightning from wrapping it again.
    `skip_next` drops the first indices of the next epoch only: a resumed run starts after the batches
    its checkpoint already counted (Lightning would otherwise replay the epoch from its first batch).
    `order` (one process): the indices in that order instead (`slot_major_order`).
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.skip_next, self.order = 0, None

    def _indices(self):
        if self.order is not None and self.num_replicas == 1:
            return self.order
        per_rank = -(-len(self.dataset) // self.num_replicas)
        return range(self.rank, per_rank * self.num_replicas, self.num_replicas)

    def __iter__(self):
        indices, self.skip_next = list(self._indices())[self.skip_next:], 0
        return iter(indices)

    def __len__(self):
        return len(self._indices())


def slot_major_order(n: int, slots: int, batch_size: int) -> list[int] | None:
    """Windows 0..n-1 regrouped so that reduction slots (window i -> slot i mod `slots`, callbacks/reduction.py) complete
    in slot order, at most `batch_size` of them under way at once (one, in batches of one): each batch takes the next
    window of each of the lowest slots that still have some.  Each slot still sees its windows in increasing order,
    every timestep of one before the next (a batch never holds two windows of one slot), and the batches keep their
    sizes.  None when the batches cannot be filled that way."""
    queues: dict[int, list[int]] = {}
    for i in range(n):
        queues.setdefault(i % slots, []).append(i)
    order = []
    for start in range(0, n, batch_size):
        lowest = sorted(s for s, q in queues.items() if q)[:min(batch_size, n - start)]
        if len(lowest) < min(batch_size, n - start):
            return None
        order += [queues[s].pop(0) for s in lowest]
    return order


class CalibrationData(L.LightningDataModule):
    def __init__(
        self,
        tokenizer: str = "minilm-dlm",
        dataset: str = "wiki-embedded",
        nsamples: int = 128,
        seqlen: int = 128,
        seed: int = 0,
        batch_size: int = 1,
        heldout_samples: int = 32,
        add_bos: bool = True,
        num_workers: int = 0,
    ):
        super().__init__()
        for name, value, low in (("nsamples", nsamples, 1), ("seqlen", seqlen, 2), ("batch_size", batch_size, 1), ("heldout_samples", heldout_samples, 0)):
            if value < low:
                raise ValueError(f"data.{name}={value} must be >= {low}")
        if dataset != "wiki-embedded" and dataset not in HUB_SOURCES:
            _check_local_files(dataset)
        self.save_hyperparameters()
        self.calibration: WindowDataset | None = None
        self.heldout: WindowDataset | None = None
        self.train_sampler: UnpaddedDistributedSampler | None = None  # the calibration loader's (train_dataloader)
        self.slot_order: list[int] | None = None  # windows slot by slot (order_by_slot), None: in order

    @classmethod
    def from_windows(cls, windows: torch.Tensor, batch_size: int = 1) -> "CalibrationData":
        """Calibration on given token windows [n, T] (benchmarks, tests): nothing tokenized, no held-out windows, no
        position kept from the noise; the same loader as the corpus windows (`order_by_slot` included)."""
        data = cls(nsamples=len(windows), seqlen=windows.shape[1], batch_size=batch_size, heldout_samples=0)
        data.calibration, data.heldout = WindowDataset(windows, n_kept=0), WindowDataset(windows[:0], n_kept=0)
        return data

    def _tokenizer(self):
        from transformers import AutoTokenizer

        from pipeline.model.loading import resolve_path

        return AutoTokenizer.from_pretrained(resolve_path(self.hparams.tokenizer), trust_remote_code=True)

    def setup(self, stage: str | None = None):
        if self.calibration is not None:
            return
        hp = self.hparams
        tok = self._tokenizer()
        bos = (tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id) if hp.add_bos else None
        body = hp.seqlen - (1 if bos is not None else 0)
        train = corpus_tokens(tok, hp.dataset, "train")
        held = corpus_tokens(tok, hp.dataset, "heldout")
        if len(train) == 0:
            raise ValueError(f"data.dataset={hp.dataset!r} has no text; give a corpus with at least seqlen={hp.seqlen} tokens")
        if len(train) <= body:
            raise ValueError(
                f"data: the calibration text has {len(train)} tokens, fewer than seqlen={hp.seqlen}; "
                "lower data.init_args.seqlen or give more text"
            )
        if hp.nsamples > len(train) // hp.seqlen:
            raise ValueError(
                f"data.nsamples={hp.nsamples} exceeds the {len(train) // hp.seqlen} non-overlapping {hp.seqlen}-token windows "
                f"of the calibration text ({len(train)} tokens): the windows would repeat it; use nsamples <= "
                f"{len(train) // hp.seqlen} or give more text"
            )
        g = torch.Generator().manual_seed(hp.seed)
        starts = torch.randint(0, len(train) - body, (hp.nsamples,), generator=g)
        self.calibration = WindowDataset(prefixed_windows(train, starts, body, bos), n_kept=int(bos is not None))
        # Spread held-out windows evenly over the whole held-out stream (non-overlapping): the first
        # windows alone would all come from one or two articles (for the embedded corpus, a list article).
        n_held = min(hp.heldout_samples, len(held) // body)
        stride = (len(held) - body) // max(n_held - 1, 1) if n_held > 1 else 0
        held_starts = torch.arange(n_held) * max(stride, body) if n_held else torch.arange(0)
        self.heldout = WindowDataset(prefixed_windows(held, held_starts, body, bos), n_kept=int(bos is not None))

    def _loader(self, ds):
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        sampler = UnpaddedDistributedSampler(ds, world, rank)
        return DataLoader(ds, batch_size=self.hparams.batch_size, sampler=sampler, shuffle=False, num_workers=self.hparams.num_workers)

    def train_dataloader(self):
        loader = self._loader(self.calibration)
        self.train_sampler = loader.sampler
        self.train_sampler.order = self.slot_order
        return loader

    def order_by_slot(self, slots: int, regroup: bool = True) -> bool:
        """Calibration windows slot by slot for `slots` reduction slots (`slot_major_order`), in one process.  With
        batches of more than one window, which windows share a batch changes: `regroup=False` refuses that.  True when
        the order is taken."""
        one_process = self.trainer is None or self.trainer.world_size == 1
        fits = self.calibration is not None and (regroup or self.hparams.batch_size == 1)
        self.slot_order = slot_major_order(len(self.calibration), slots, self.hparams.batch_size) if one_process and fits else None
        if self.train_sampler is not None:  # a loader built already: its sampler reads it when iterated
            self.train_sampler.order = self.slot_order
        return self.slot_order is not None

    def skip_batches(self, n: int) -> None:
        """Resume: the next calibration epoch starts after its first n batches (on this rank)."""
        self.train_sampler.skip_next = n * self.hparams.batch_size

    def heldout_dataloader(self):
        return self._loader(self.heldout)
