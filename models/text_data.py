"""Text data shipped with gensim's test suite: word-similarity sets and an English Wikipedia sample.

- WordSim-353 and SimLex-999: word pairs with mean human similarity scores, scored by the
  Spearman rank correlation between embedding cosine similarity and the human score.
- enwiki sample (about 200 pages, 107 real articles after dropping redirects): plain text for
  calibration and perplexity. Calibration and evaluation articles are DISJOINT: every
  fourth article (in dump order) is calibration, the rest evaluation.
"""

from __future__ import annotations

import bz2
import functools
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

WORD_SETS = {"wordsim353": "wordsim353.tsv", "simlex999": "simlex999.txt"}
# Lee, Pincombe & Welsh (2005): 50 news documents and their mean human similarity ratings (upper triangle)
LEE_DOCUMENTS, LEE_SIMILARITIES = "lee.cor", "similarities0-1.txt"
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
CALIB_EVERY = 4  # article i is calibration when i % CALIB_EVERY == 0


def test_data_dir() -> Path:
    import gensim

    return Path(gensim.__file__).parent / "test" / "test_data"


# ---------------------------------------------------------------- word similarity


def word_pairs(dataset: str) -> tuple[list[tuple[str, str]], np.ndarray]:
    """(pairs, human scores) of 'wordsim353' (353 pairs) or 'simlex999' (999 pairs)."""
    pairs, scores = [], []
    for line in (test_data_dir() / WORD_SETS[dataset]).read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        a, b, score = line.split("\t")[:3]
        pairs.append((a.strip(), b.strip()))
        scores.append(float(score))
    return pairs, np.asarray(scores, dtype=np.float64)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def word_similarity_spearman(embed_fn: Callable[[list[str]], np.ndarray], dataset: str) -> float:
    """Spearman rho between cos(embed(a), embed(b)) and the human scores of `dataset`.

    embed_fn maps a list of words (each embedded as a one-word sentence) to an (n, d) array;
    every distinct word is embedded once.
    """
    pairs, human = word_pairs(dataset)
    words = sorted({w for pair in pairs for w in pair})
    vectors = np.asarray(embed_fn(words), dtype=np.float64)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True) + 1e-12
    index = {w: i for i, w in enumerate(words)}
    cosine = [float(vectors[index[a]] @ vectors[index[b]]) for a, b in pairs]
    return spearman(cosine, human)


# ---------------------------------------------------------------- Wikipedia text

_HEADING = re.compile(r"^\s*=+[^=]+=+\s*$")
_EMPHASIS = re.compile(r"'{2,}")  # ''italic'' and '''bold''' quotes left by filter_wiki
_BLANKS = re.compile(r"\n{3,}")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(A-Z0-9])")


def _plain_text(wikitext: str) -> str:
    """Wiki markup -> paragraphs of prose: gensim strips templates, links, refs and tables;
    then headings are dropped, emphasis quotes and bullet marks removed, blank runs collapsed."""
    from gensim.corpora.wikicorpus import filter_wiki

    lines = []
    for line in filter_wiki(wikitext).splitlines():
        if _HEADING.match(line):
            continue
        line = _EMPHASIS.sub("", line).lstrip("*#:; ").rstrip()
        lines.append(line)
    return _BLANKS.sub("\n\n", "\n".join(lines)).strip()


@functools.lru_cache(maxsize=1)
def _articles() -> tuple[tuple[str, str], ...]:
    """All real articles of the dump as (title, plain text), in dump order."""
    from gensim.corpora.wikicorpus import extract_pages

    out = []
    with bz2.open(test_data_dir() / WIKI_FILE) as f:
        for title, text, _ in extract_pages(f, filter_namespaces=("0",)):
            if text.lstrip().lower().startswith("#redirect") or "(disambiguation)" in title:
                continue
            plain = _plain_text(text)
            if len(plain) >= 500:  # drops stubs and project pages with no prose
                out.append((title, plain))
    return tuple(out)


def wiki_articles(split: str) -> list[tuple[str, str]]:
    """(title, plain text) of the 'calib' or 'eval' articles; the two splits share no article."""
    if split not in ("calib", "eval"):
        raise ValueError(f"split must be 'calib' or 'eval', not {split!r}")
    want_calib = split == "calib"
    return [a for i, a in enumerate(_articles()) if (i % CALIB_EVERY == 0) == want_calib]


def wiki_text(split: str) -> str:
    """The split's articles joined into one string, articles separated by a blank line."""
    return "\n\n".join(text for _, text in wiki_articles(split))


def wiki_sentences(split: str, min_words: int = 4, max_words: int = 64) -> list[str]:
    """Sentences of the split's articles (a crude split at . ! ?), of min..max words."""
    out = []
    for _, text in wiki_articles(split):
        for paragraph in text.split("\n"):
            for sentence in _SENTENCE_END.split(paragraph.strip()):
                if min_words <= len(sentence.split()) <= max_words:
                    out.append(sentence)
    return out


# ---------------------------------------------------------------- document similarity


def document_similarity_spearman(embed: Callable[[Sequence[str]], np.ndarray]) -> float:
    """Spearman ρ between embedding cosine and the human ratings over the Lee set's 1225 document
    pairs; `embed` maps documents to (n, d) embeddings."""
    docs = (test_data_dir() / LEE_DOCUMENTS).read_text(encoding="latin-1").strip().splitlines()  # 1990s news text
    human = np.loadtxt(test_data_dir() / LEE_SIMILARITIES)
    vectors = np.asarray(embed(docs), dtype=np.float64)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    upper = np.triu_indices(len(docs), k=1)
    return spearman((vectors @ vectors.T)[upper], human[upper])
