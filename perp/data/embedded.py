"""The embedded offline corpus: real English Wikipedia articles that ship inside the gensim wheel.

Source: `gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`, a
shortened dump of the first English Wikipedia articles (Anarchism, Autism, Albedo, ...) that gensim ships as
test data. Wikipedia text is licensed CC BY-SA 3.0 (and GFDL); gensim itself is LGPL-2.1. The markup is removed
with gensim's own `filter_wiki`, and the articles are split by article into disjoint parts: every fifth
article (by position in the dump) is evaluation text, the rest calibration text. No network access is needed.
"""

from __future__ import annotations

import bz2
import json
import re
from pathlib import Path

from perp.config import EMBEDDED_SPLITS
from perp.errors import DataSourceError

GENSIM_DUMP = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_EVAL_EVERY = 5
_CLEANER_VERSION = "1"
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.MULTILINE)
_EMPHASIS = re.compile(r"'{2,}")
_BLANK_LINES = re.compile(r"\n{3,}")


def _dump_path() -> Path:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        path = Path(str(distribution("gensim").locate_file(GENSIM_DUMP)))
    except PackageNotFoundError:
        raise DataSourceError("the embedded corpus needs the 'gensim' package: pip install gensim") from None
    if not path.is_file():
        raise DataSourceError(f"gensim is installed but its test data {GENSIM_DUMP} is missing")
    return path


def clean_article(wikitext: str) -> str:
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(wikitext)
    def heading(match: re.Match) -> str:
        marks = " ".join("=" * len(match.group(1)))
        return f"{marks} {match.group(2)} {marks}"

    text = _HEADING.sub(heading, text)
    text = _EMPHASIS.sub("", text)
    lines = [line.strip() for line in text.splitlines()]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def _articles() -> list[tuple[str, str]]:
    from gensim.corpora.wikicorpus import extract_pages

    articles = []
    with bz2.BZ2File(_dump_path()) as handle:
        for title, text, _page_id in extract_pages(handle):
            if not text or text.lstrip().lower().startswith("#redirect"):
                continue
            cleaned = clean_article(text)
            if len(cleaned) > 200:
                articles.append((title, cleaned))
    return articles


def embedded_documents(split: str) -> list[str]:
    """The cleaned articles of one split (`wiki-calib` or `wiki-eval`), each a document; cached after first use."""
    from perp.io.cache import cache_dir

    if split not in EMBEDDED_SPLITS:
        raise DataSourceError(f"unknown embedded corpus '{split}' (allowed: {', '.join(EMBEDDED_SPLITS)})")
    cache_file = cache_dir("data") / f"enwiki-gensim-v{_CLEANER_VERSION}.json"
    if cache_file.is_file():
        articles = json.loads(cache_file.read_text())
    else:
        articles = _articles()
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(articles))
        tmp.replace(cache_file)
    want_eval = split == "wiki-eval"
    return [text for index, (_, text) in enumerate(articles) if (index % _EVAL_EVERY == _EVAL_EVERY - 1) == want_eval]
