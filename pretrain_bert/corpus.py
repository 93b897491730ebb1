"""Raw text -> documents -> sentences, the input side of BERT pretraining data.

`create_pretraining_data.py` (google-research/bert, copied by NVIDIA DeepLearningExamples)
wants one sentence per line and a blank line between documents; NVIDIA gets there from
Wikipedia with its own formatting + nltk sentence split. This module reads plain text and
produces the same structure without any download.

Document rule, per input file (decided from the file's first non-blank line):

- **WikiText-style** file (first non-blank line is a top-level heading `` = Title = ``):
  every top-level heading starts a new document (one Wikipedia article each); all heading
  lines of any level (`` = = Section = = ``) are dropped; blank lines are paragraph breaks
  only. With `detokenize_wikitext` (default), the tokenised release's number separators are
  joined back (``1 @,@ 000`` -> ``1,000``, ``0 @.@ 7`` -> ``0.7``, ``a @-@ b`` -> ``a-b``);
  ``<unk>`` is kept as the marker `UNK_MARKER`, which the tokeniser maps to [UNK].
- **Plain** file (the reference format): a blank (whitespace-only) line ends a document.
- The end of a file always ends a document (the reference would run the last document of
  one file into the next file; files are independent sources here).

Sentence rule (`split_sentences`, deterministic, no model): each non-blank line is split on
its own (a line break is always a sentence boundary, so one-sentence-per-line files pass
through unchanged). Inside a line, a sentence ends after a whitespace-separated word that
ends in ``.``, ``!`` or ``?`` (optionally followed by closing quotes or brackets) when the
next word starts with an upper-case letter, a digit or an opening quote/bracket -- unless
the word ends in ``.`` and is an abbreviation: a single letter (initials, ``H. americanus``),
a word with an inner dot (``U.S.``, ``e.g.``) or one of `ABBREVIATIONS` (``Mr.``, ``Dr.``...).

Bytes that are not UTF-8: the offending *line* is skipped and counted (`CorpusStats`), and
the file is named in `files_with_non_utf8`; the rest of the file is used. Empty files are
counted, not errors. A missing path is a `FileNotFoundError` naming it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

UNK_MARKER = "<unk>"
ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr vs etc no nos fig figs gen col lt sgt capt cmdr adm gov sen rep "
    "rev mt ft inc ltd co corp dept univ approx est jan feb mar apr jun jul aug sep sept oct "
    "nov dec".split())
_TOP_HEADING = re.compile(r"^= [^=].* =$")
_ANY_HEADING = re.compile(r"^(= )+.*( =)+$")
_WIKITEXT_JOINS = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))
_CLOSERS = "\"')]}\u201d\u2019"
_OPENERS = "\"'([{\u201c\u2018"


@dataclass
class CorpusStats:
    """What reading the input produced and skipped; written to meta.json."""

    files: int = 0
    empty_files: int = 0
    non_utf8_lines: int = 0
    files_with_non_utf8: list[str] = field(default_factory=list)
    documents: int = 0
    sentences: int = 0


def list_input_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files given directly, plus the `*.txt` files under given folders (recursive, sorted)."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not found:
                raise FileNotFoundError(f"input folder {str(path)!r} contains no *.txt file")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"input path {str(path)!r} does not exist")
    return files


def split_sentences(line: str) -> list[str]:
    """Split one line into sentences by the rule in the module docstring."""
    words = line.split()
    sentences, current = [], []
    for i, word in enumerate(words):
        current.append(word)
        if i + 1 < len(words) and _ends_sentence(word, words[i + 1]):
            sentences.append(" ".join(current))
            current = []
    if current:
        sentences.append(" ".join(current))
    return sentences


def _ends_sentence(word: str, next_word: str) -> bool:
    core = word.rstrip(_CLOSERS)
    if not core or core[-1] not in ".!?":
        return False
    start = next_word.lstrip(_OPENERS)
    if not (next_word[0] in _OPENERS or (start and (start[0].isupper() or start[0].isdigit()))):
        return False
    if core[-1] == ".":
        stem = core.rstrip(".")
        if len(stem) == 1 and stem.isalpha():
            return False                      # initials: "H. americanus"
        if "." in stem or stem.lower() in ABBREVIATIONS:
            return False                      # "U.S.", "e.g.", "Dr."
    return True


def _decoded_lines(path: Path, stats: CorpusStats) -> Iterator[str]:
    bad = 0
    with open(path, "rb") as handle:
        for raw in handle:
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError:
                bad += 1
    if bad:
        stats.non_utf8_lines += bad
        stats.files_with_non_utf8.append(str(path))


def _counted(document: list[str], stats: CorpusStats, max_documents: int | None) -> bool:
    """Count a finished document in ``stats``; True once ``max_documents`` are done."""
    stats.documents += 1
    stats.sentences += len(document)
    return max_documents is not None and stats.documents >= max_documents


def _detokenize_wikitext(line: str) -> str:
    for old, new in _WIKITEXT_JOINS:
        line = line.replace(old, new)
    return line


def read_documents(paths: Iterable[str | Path], stats: CorpusStats | None = None,
                   detokenize_wikitext: bool = True,
                   max_documents: int | None = None) -> Iterator[list[str]]:
    """Yield documents (lists of sentence strings) from files/folders, in input order.

    `stats` is updated as files are read (so it is complete once the iterator is exhausted);
    `max_documents` stops after that many non-empty documents.
    """
    stats = stats if stats is not None else CorpusStats()
    for path in list_input_files(paths):
        stats.files += 1
        if path.stat().st_size == 0:
            stats.empty_files += 1
            continue
        wikitext: bool | None = None
        document: list[str] = []
        for line in _decoded_lines(path, stats):
            text = line.strip()
            if wikitext is None and text:
                wikitext = bool(_TOP_HEADING.match(text))
            heading = bool(wikitext and _ANY_HEADING.match(text))
            if heading and not _TOP_HEADING.match(text):
                continue                          # section headings are not sentences
            if heading or (not text and not wikitext):
                if document:
                    yield document
                    if _counted(document, stats, max_documents):
                        return
                document = []
                continue
            if not text:
                continue
            if wikitext and detokenize_wikitext:
                text = _detokenize_wikitext(text)
            document.extend(split_sentences(text))
        if wikitext is None:                  # only whitespace in the file
            stats.empty_files += 1
        if document:
            yield document
            if _counted(document, stats, max_documents):
                return
