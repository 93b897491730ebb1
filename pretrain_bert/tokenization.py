"""Uncased BERT WordPiece tokenizers: load one from a local vocabulary, or train a small one.

`load_tokenizer` never touches the network. `train_wordpiece` builds a new uncased
vocabulary with the `tokenizers` library using BERT's own normaliser (clean text, CJK
spacing, lower case + accent stripping) and pre-tokenizer (whitespace + punctuation split),
so a model with a small vocabulary sees text cut exactly as BERT-base's would be.

CLI: ``python -m pretrain_bert.tokenization --input FILE... --vocab-size 8000 --out DIR``.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

if TYPE_CHECKING:
    from transformers import BertTokenizerFast

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _read_vocab(vocab_file: Path) -> dict[str, int]:
    with open(vocab_file, encoding="utf-8") as handle:
        return {line.rstrip("\n"): index for index, line in enumerate(handle)}


def load_tokenizer(vocab: str | Path, *, do_lower_case: bool = True) -> BertTokenizerFast:
    """A fast BERT tokenizer from a WordPiece `vocab.txt` file, or a folder with tokenizer files.

    A folder holding `tokenizer.json` / `tokenizer_config.json` is loaded with
    `from_pretrained` (local files only); a folder with only `vocab.txt` is read as a vocab file.
    The one loader of the project: data preparation, the pretraining export and SQuAD (which
    needs the fast tokenizer's character offsets) all use it.
    """
    from transformers import BertTokenizerFast

    path = Path(vocab)
    if not path.exists():
        raise FileNotFoundError(f"vocabulary {str(path)!r} does not exist "
                                "(expected a vocab.txt file or a tokenizer folder)")
    if path.is_dir() and ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
        tokenizer = BertTokenizerFast.from_pretrained(str(path), local_files_only=True)
    else:
        if path.is_dir():
            if not (path / "vocab.txt").is_file():
                raise FileNotFoundError(f"tokenizer folder {str(path)!r} has neither tokenizer.json, "
                                        "tokenizer_config.json nor vocab.txt")
            path = path / "vocab.txt"
        ids = _read_vocab(path)
        if "vocab_file" in inspect.signature(BertTokenizerFast.__init__).parameters:
            tokenizer = BertTokenizerFast(vocab_file=str(path), do_lower_case=do_lower_case)  # transformers 4.x
        else:
            tokenizer = BertTokenizerFast(vocab=ids, do_lower_case=do_lower_case)  # transformers 5.x
        if len(tokenizer) != len(ids) or tokenizer.cls_token_id != ids.get("[CLS]"):
            raise ValueError(f"{path}: tokenizer built with {len(tokenizer)} entries, "
                             f"vocab file has {len(ids)} (is it a WordPiece vocab.txt?)")
    if not tokenizer.is_fast:
        raise ValueError(f"{path}: offsets need a fast tokenizer, got {type(tokenizer).__name__}")
    return tokenizer


def vocab_sha256(tokenizer: BertTokenizerFast) -> str:
    """Hash of the vocabulary in id order: equal hashes mean identical token ids."""
    by_id = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256("\n".join(token for token, _ in by_id).encode("utf-8")).hexdigest()


def _lines(text_files: Iterable[str | Path]) -> Iterator[str]:
    for name in text_files:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"training text {str(path)!r} does not exist")
        with open(path, encoding="utf-8", errors="replace") as handle:
            yield from handle


def train_wordpiece(text_files: Iterable[str | Path], vocab_size: int, out_dir: str | Path,
                    min_frequency: int = 2, limit_alphabet: int = 1000) -> Path:
    """Train an uncased WordPiece vocabulary on `text_files`; write `out_dir/vocab.txt`.

    Special tokens take ids 0..4 in the order of `SPECIAL_TOKENS` ([PAD] = 0 as in BERT).
    Undecodable bytes become U+FFFD. Returns the path of `vocab.txt`, which `load_tokenizer`
    (and `python -m pretrain_bert.data --vocab`) accepts.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, "
                         f"got {vocab_size}")
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    tokenizer.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                      strip_accents=None, lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        limit_alphabet=limit_alphabet,
                                        special_tokens=list(SPECIAL_TOKENS),
                                        continuing_subword_prefix="##", show_progress=False)
    tokenizer.train_from_iterator(_lines(text_files), trainer=trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = tokenizer.get_vocab()
    vocab_file = out / "vocab.txt"
    with open(vocab_file, "w", encoding="utf-8") as handle:
        for token, _ in sorted(vocab.items(), key=lambda item: item[1]):
            handle.write(token + "\n")
    return vocab_file


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True, help="text files to train on")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--out", required=True, help="folder to write vocab.txt into")
    parser.add_argument("--min-frequency", type=int, default=2)
    args = parser.parse_args(argv)
    print(train_wordpiece(args.input, args.vocab_size, args.out, args.min_frequency))


if __name__ == "__main__":
    main()
