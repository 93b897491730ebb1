"""The instance-making core of google-research/bert `create_pretraining_data.py`, on token ids.

A line-for-line port (NVIDIA DeepLearningExamples ships the same file), drawing from one
`random.Random` in the reference's order, so equal documents and seed give the reference's
instances. The recipe, stated in full in `pretrain_bert.data`'s docstring: chunks filling
`target_seq_length` (short with p `short_seq_prob`), A/B split with a 50% random next from
another document (unused segments put back), `truncate_seq_pair`, ``[CLS] A [SEP] B [SEP]``,
15% masking with 80% [MASK] / 10% random id / 10% unchanged, at most `max_predictions`.
"""

from __future__ import annotations

import dataclasses
import random

from tqdm.auto import tqdm


@dataclasses.dataclass(frozen=True)
class InstanceConfig:
    """Everything that determines the instances (written to meta.json)."""

    seq_len: int = 128
    max_predictions: int = 20
    dupe_factor: int = 5
    seed: int = 12345
    masked_lm_prob: float = 0.15
    short_seq_prob: float = 0.1
    whole_word_mask: bool = False
    heldout_fraction: float = 0.02
    heldout_dupe_factor: int = 1
    max_documents: int | None = None
    drop_single_sentence_documents: bool = False
    detokenize_wikitext: bool = True

    def __post_init__(self):
        if self.seq_len < 5:
            raise ValueError(f"seq_len must be >= 5 ([CLS] A [SEP] B [SEP]), got {self.seq_len}")
        if not 1 <= self.max_predictions <= self.seq_len:
            raise ValueError(f"max_predictions must be in [1, seq_len={self.seq_len}], "
                             f"got {self.max_predictions}")
        if self.dupe_factor < 1 or self.heldout_dupe_factor < 1:
            raise ValueError(f"dupe factors must be >= 1, got {self.dupe_factor} and "
                             f"{self.heldout_dupe_factor}")
        for name in ("masked_lm_prob", "short_seq_prob", "heldout_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.max_documents is not None and self.max_documents < 1:
            raise ValueError(f"max_documents must be >= 1 or None, got {self.max_documents}")


@dataclasses.dataclass(frozen=True)
class VocabIds:
    size: int
    cls: int
    sep: int
    mask: int
    is_continuation: bytes   # is_continuation[id] == 1 iff the token starts with "##"




def vocab_ids(tokenizer) -> VocabIds:
    vocab = tokenizer.get_vocab()
    flags = bytearray(max(vocab.values()) + 1)
    for token, index in vocab.items():
        flags[index] = token.startswith("##")
    return VocabIds(size=len(flags), cls=tokenizer.cls_token_id, sep=tokenizer.sep_token_id,
                    mask=tokenizer.mask_token_id, is_continuation=bytes(flags))


def truncate_seq_pair(tokens_a: list[int], tokens_b: list[int], max_num_tokens: int,
                      rng: random.Random) -> None:
    """Trim the longer list, from the front or the back at random, until both fit."""
    while len(tokens_a) + len(tokens_b) > max_num_tokens:
        trunc_tokens = tokens_a if len(tokens_a) > len(tokens_b) else tokens_b
        if rng.random() < 0.5:
            del trunc_tokens[0]
        else:
            trunc_tokens.pop()


def create_masked_lm_predictions(tokens: list[int], config: InstanceConfig, vocab: VocabIds,
                                 rng: random.Random) -> tuple[list[int], list[int], list[int]]:
    """(masked tokens, sorted positions, original ids) exactly as the reference draws them."""
    cand_indexes: list[list[int]] = []
    for i, token in enumerate(tokens):
        if token == vocab.cls or token == vocab.sep:
            continue
        if config.whole_word_mask and cand_indexes and vocab.is_continuation[token]:
            cand_indexes[-1].append(i)
        else:
            cand_indexes.append([i])
    rng.shuffle(cand_indexes)
    output_tokens = list(tokens)
    num_to_predict = min(config.max_predictions,
                         max(1, int(round(len(tokens) * config.masked_lm_prob))))
    masked: list[tuple[int, int]] = []
    covered: set[int] = set()
    for index_set in cand_indexes:
        if len(masked) >= num_to_predict:
            break
        if len(masked) + len(index_set) > num_to_predict:
            continue
        if any(index in covered for index in index_set):
            continue
        for index in index_set:
            covered.add(index)
            if rng.random() < 0.8:
                replacement = vocab.mask
            elif rng.random() < 0.5:
                replacement = tokens[index]
            else:
                replacement = rng.randint(0, vocab.size - 1)
            output_tokens[index] = replacement
            masked.append((index, tokens[index]))
    masked.sort()
    return output_tokens, [index for index, _ in masked], [label for _, label in masked]


def create_instances_from_document(all_documents: list[list[list[int]]], document_index: int,
                                   config: InstanceConfig, vocab: VocabIds,
                                   rng: random.Random) -> list[tuple]:
    """Instances (tokens, segment_ids, positions, labels, is_random_next) of one document."""
    document = all_documents[document_index]
    max_num_tokens = config.seq_len - 3
    target_seq_length = max_num_tokens
    if rng.random() < config.short_seq_prob:
        target_seq_length = rng.randint(2, max_num_tokens)
    instances = []
    current_chunk: list[list[int]] = []
    current_length = 0
    i = 0
    while i < len(document):
        current_chunk.append(document[i])
        current_length += len(document[i])
        if i == len(document) - 1 or current_length >= target_seq_length:
            a_end = rng.randint(1, len(current_chunk) - 1) if len(current_chunk) >= 2 else 1
            tokens_a = [token for segment in current_chunk[:a_end] for token in segment]
            tokens_b: list[int] = []
            if len(current_chunk) == 1 or rng.random() < 0.5:
                is_random_next = True
                target_b_length = target_seq_length - len(tokens_a)
                for _ in range(10):
                    random_document_index = rng.randint(0, len(all_documents) - 1)
                    if random_document_index != document_index:
                        break
                random_document = all_documents[random_document_index]
                random_start = rng.randint(0, len(random_document) - 1)
                for j in range(random_start, len(random_document)):
                    tokens_b.extend(random_document[j])
                    if len(tokens_b) >= target_b_length:
                        break
                i -= len(current_chunk) - a_end   # put the unused segments back
            else:
                is_random_next = False
                tokens_b = [token for segment in current_chunk[a_end:] for token in segment]
            truncate_seq_pair(tokens_a, tokens_b, max_num_tokens, rng)
            tokens = [vocab.cls, *tokens_a, vocab.sep, *tokens_b, vocab.sep]
            segment_ids = [0] * (len(tokens_a) + 2) + [1] * (len(tokens_b) + 1)
            tokens, positions, labels = create_masked_lm_predictions(tokens, config, vocab, rng)
            instances.append((tokens, segment_ids, positions, labels, is_random_next))
            current_chunk, current_length = [], 0
        i += 1
    return instances


def create_instances(documents: list[list[list[int]]], config: InstanceConfig, vocab: VocabIds,
                     rng: random.Random, dupe_factor: int, desc: str = "instances",
                     progress: bool = False) -> list[tuple]:
    """`dupe_factor` passes over all documents, then one shuffle of all instances."""
    instances: list[tuple] = []
    with tqdm(total=dupe_factor * len(documents), desc=desc, unit="doc",
              disable=not progress) as bar:
        for _ in range(dupe_factor):
            for document_index in range(len(documents)):
                instances.extend(create_instances_from_document(documents, document_index,
                                                                config, vocab, rng))
                bar.update()
    rng.shuffle(instances)
    return instances
