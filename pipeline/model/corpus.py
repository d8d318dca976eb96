"""The embedded offline corpus: real English Wikipedia articles shipped inside gensim's wheel.

Nothing here is committed text: the articles are read from the installed package at run time.
Whole articles are held out (every tenth, in dump order) so that scoring never sees calibration text.
"""
from __future__ import annotations

import bz2
import functools
import re

WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
HELDOUT_EVERY = 10  # article i is held out when i % HELDOUT_EVERY == HELDOUT_EVERY - 1

_MARKUP = [
    (re.compile(r"'{2,}"), ""),  # bold / italics quotes left by filter_wiki
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),  # section headings
    (re.compile(r"^[*#:;]+\s*", re.M), ""),  # list markers
    (re.compile(r"\[\[|\]\]"), ""),
    (re.compile(r"[ \t]+"), " "),
    (re.compile(r"\n{3,}"), "\n\n"),
]


def _clean(text: str) -> str:
    for pattern, repl in _MARKUP:
        text = pattern.sub(repl, text)
    return text.strip()


@functools.lru_cache(maxsize=1)
def wiki_articles() -> tuple[tuple[str, str], ...]:
    """All non-redirect articles of the dump as (title, plain text), in dump order."""
    try:
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
        from gensim.test.utils import datapath
    except ImportError as exc:  # pragma: no cover - gensim is a declared dependency
        raise RuntimeError("the embedded corpus needs gensim: pip install gensim") from exc
    articles = []
    with bz2.open(datapath(WIKI_DUMP)) as fh:
        for title, text, _pageid in extract_pages(fh):
            if not text or text.lstrip().lower().startswith("#redirect"):
                continue
            body = _clean(filter_wiki(text))
            if body:
                articles.append((title, body))
    return tuple(articles)


def wiki_split(split: str) -> list[str]:
    """Article texts of the 'train' or 'heldout' split."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r} is not a corpus split; use 'train' or 'heldout'")
    held = split == "heldout"
    return [
        text
        for i, (_title, text) in enumerate(wiki_articles())
        if (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) == held
    ]
