"""Offline lm-eval tasks whose data is generated at run time from installed packages (no hub, no committed text).

    python -m pipeline.evaluation.offline_tasks            # writes the data files into the cache, prints paths and counts

Tasks (YAMLs in configs/tasks/):
  mmlu_dev_offline    the 282 real MMLU dev questions (57 subjects) that lm-eval's wheel ships in
                      tasks/mmlu/flan_cot_fewshot/_cot_prompts.json, parsed back into multiple choice
                      (281 have 4 options; one college_chemistry question has 5, kept as given).
  wiki_cloze_offline  next-word cloze on the held-out Wikipedia articles (pipeline.model.corpus): a prose passage
                      of 60-100 words (list/table passages skipped), the plain word of 4+ letters that
                      follows it, and 3 distractors drawn from the same article's words with their
                      frequencies and matching capitalisation (so a unigram prior scores chance, 25%:
                      beating it takes the context).  Fixed seed; documents shuffled across articles so
                      that --limit N is a fair sample.

How a YAML finds its data: the YAML says `dataset_path: json` and
`custom_dataset: !function pipeline.evaluation.offline_tasks.<task name>`; lm-eval 0.4.13 resolves the `!function`
(a module importable from where lm-eval runs: the repository root, or an installed checkout) only when
the task is built, and calls it with the task metadata.  That function writes the JSON-lines file into
the cache if it is missing (atomically, so concurrent ranks are safe) and loads it with
`datasets.load_dataset("json", data_files=...)`.  Cache: $SINKPRUNE_CACHE/offline_tasks, default
~/.cache/sinkprune/offline_tasks; file names carry a builder version and a digest of the source.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tempfile
from collections import Counter
from pathlib import Path

BUILDER_VERSION = 2
WIKI_CLOZE_SEED = 1234
WIKI_PASSAGE_WORDS = (60, 100)
N_CHOICES = 4
# a plain word: lowercase, or capitalised once (not "GibbonsUrie", which list markup leaves behind)
CLOZE_WORD = re.compile(r"^(?:[A-Z][a-z]{3,}|[a-z]{4,})$")
PROSE_WORD = re.compile(r"^[a-z]+[,.;:]?$")
MIN_PROSE_FRACTION = 0.5  # passages of lists and tables (mostly names, numbers) are skipped
TASK_DIR = Path(__file__).resolve().parents[2] / "configs" / "tasks"


def cache_dir() -> Path:
    root = Path(os.environ.get("SINKPRUNE_CACHE", Path.home() / ".cache" / "sinkprune"))
    return root / "offline_tasks"


# ---------------------------------------------------------------------------------------------- MMLU dev
def mmlu_prompts_path() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "flan_cot_fewshot" / "_cot_prompts.json"


_CHOICE = re.compile(r"\(([A-E])\)\s*")
_ANSWER = re.compile(r"answer is \(([A-E])\)")


def parse_cot_question(block: str) -> dict | None:
    """'Q: question\\n(A) .. (B) ..\\nA: rationale. The answer is (X).' -> question, choices, answer index.

    The options are on one line or on one line each; None when the block does not parse.
    """
    block = block.strip()
    if block.startswith("Q:"):
        block = block[2:].strip()
    question_part, sep, rationale = block.partition("\nA: ")
    answers = _ANSWER.findall(rationale)
    if not sep or not answers:
        return None
    lines = question_part.split("\n")
    choice_line = next((i for i in range(len(lines) - 1, -1, -1) if lines[i].lstrip().startswith("(A)")), None)
    if choice_line is None:
        return None
    choices_text = " ".join(line.strip() for line in lines[choice_line:])  # one line, or one per option
    parts = _CHOICE.split(choices_text)[1:]  # [letter, text, letter, text, ...]
    letters, texts = parts[0::2], [t.strip() for t in parts[1::2]]
    if letters != list("ABCDE"[: len(letters)]) or answers[-1] not in letters:
        return None
    return {
        "question": "\n".join(lines[:choice_line]).strip(),
        "choices": texts,
        "answer": letters.index(answers[-1]),
    }


def mmlu_dev_records() -> list[dict]:
    prompts = json.loads(mmlu_prompts_path().read_text())
    records = []
    for subject, text in prompts.items():
        _header, _, body = text.partition("\n\nQ: ")
        for block in body.split("\n\nQ: "):
            parsed = parse_cot_question(block)
            if parsed is not None:
                records.append({"subject": subject, **parsed})
    return records


# --------------------------------------------------------------------------------------- Wikipedia cloze
def _sample_distractors(rng: random.Random, pool: list[str], target: str, n: int) -> list[str] | None:
    """n distinct words drawn by frequency from pool (word occurrences), none equal to the target."""
    candidates = {w.lower() for w in pool} - {target.lower()}
    if len(candidates) < n:
        return None
    chosen: dict[str, str] = {}
    while len(chosen) < n:
        word = rng.choice(pool)
        if word.lower() != target.lower() and word.lower() not in chosen:
            chosen[word.lower()] = word
    return list(chosen.values())


def article_cloze_items(words: list[str], rng: random.Random, article_index: int) -> list[dict]:
    lo, hi = WIKI_PASSAGE_WORDS
    pools = {True: [], False: []}  # capitalised or not -> word occurrences
    for w in words:
        if CLOZE_WORD.match(w):
            pools[w[0].isupper()].append(w)
    items, start = [], 0
    while start + hi < len(words):
        first = start + rng.randint(lo, hi)
        end = next((i for i in range(first, start + hi + 1) if CLOZE_WORD.match(words[i])), None)
        if end is None:
            start += hi + 1
            continue
        passage = words[start:end]
        if sum(bool(PROSE_WORD.match(w)) for w in passage) < MIN_PROSE_FRACTION * len(passage):
            start = end + 1
            continue
        target = words[end]
        distractors = _sample_distractors(rng, pools[target[0].isupper()], target, N_CHOICES - 1)
        if distractors is not None:
            choices = [target, *distractors]
            rng.shuffle(choices)
            items.append({
                "passage": " ".join(passage),
                "choices": choices,
                "label": choices.index(target),
                "article": article_index,
            })
        start = end + 1
    return items


def wiki_cloze_records(seed: int = WIKI_CLOZE_SEED) -> list[dict]:
    from pipeline.model.corpus import wiki_split

    rng = random.Random(seed)
    records = []
    for index, text in enumerate(wiki_split("heldout")):
        records.extend(article_cloze_items(text.split(), rng, index))
    rng.shuffle(records)  # so that lm-eval's --limit N takes a sample of all articles, not the first one
    return records


# ----------------------------------------------------------------------------------- files and datasets
BUILDERS = {"mmlu_dev_offline": mmlu_dev_records, "wiki_cloze_offline": wiki_cloze_records}


def _source_digest(name: str) -> str:
    if name == "mmlu_dev_offline":
        source = mmlu_prompts_path().read_bytes()
    else:
        from pipeline.model.corpus import WIKI_DUMP, HELDOUT_EVERY

        source = f"{WIKI_DUMP}:{HELDOUT_EVERY}:{WIKI_CLOZE_SEED}:{WIKI_PASSAGE_WORDS}:{MIN_PROSE_FRACTION}".encode()
    return hashlib.sha256(source).hexdigest()[:12]


def data_file(name: str) -> Path:
    """The task's JSON-lines file in the cache, generated on first use."""
    if name not in BUILDERS:
        raise KeyError(f"unknown offline task {name!r}; known: {', '.join(BUILDERS)}")
    path = cache_dir() / f"{name}-v{BUILDER_VERSION}-{_source_digest(name)}.jsonl"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".jsonl", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                for record in BUILDERS[name]():
                    fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


def load_offline_dataset(name: str):
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(data_file(name))})


def mmlu_dev_offline(**_task_metadata):
    """lm-eval `custom_dataset` hook of configs/tasks/mmlu_dev_offline.yaml (metadata is ignored)."""
    return load_offline_dataset("mmlu_dev_offline")


def wiki_cloze_offline(**_task_metadata):
    """lm-eval `custom_dataset` hook of configs/tasks/wiki_cloze_offline.yaml (metadata is ignored)."""
    return load_offline_dataset("wiki_cloze_offline")


def prepare(names=None) -> dict[str, Path]:
    return {name: data_file(name) for name in (names or BUILDERS)}


def main() -> None:
    for name, path in prepare().items():
        with path.open() as fh:
            count = sum(1 for _ in fh)
        print(f"{name}: {count} docs -> {path}")
    print(f"task YAMLs: {TASK_DIR}  (lm-eval: --include_path {TASK_DIR})")


if __name__ == "__main__":
    main()
