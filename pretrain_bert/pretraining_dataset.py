"""Reading what `python -m pretrain_bert.data` wrote: datasets, batches, labels, dynamic masks.

    dataset = load_pretraining_data("data/wikitext-128", split="train")
    loader = DataLoader(dataset, batch_size=32, collate_fn=collate)          # static masks
    loader = DataLoader(dataset, batch_size=32,
                        collate_fn=DynamicMaskingCollator("data/wikitext-128", seed=0))

Batches are dicts of int64 tensors named exactly as `COLUMNS`; `BertForPreTrainingMasked`
takes them as they are, and `to_hf_inputs` turns one into the stock
`BertForPreTraining` arguments (full-length `labels`, -100 where unmasked).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import torch

from pretrain_bert.modeling import masked_to_labels

FORMAT = "vrgd-ds/bert-pretraining-static-masks/1"
SPLITS = ("train", "heldout")
COLUMNS = ("input_ids", "token_type_ids", "attention_mask", "masked_lm_positions",
           "masked_lm_ids", "next_sentence_label")


def load_meta(path: str | Path) -> dict:
    """meta.json of a prepared data folder; the folder is complete iff this file exists."""
    meta_file = Path(path) / "meta.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a prepared pretraining data folder "
                                f"(no meta.json); run python -m pretrain_bert.data first")
    with open(meta_file, encoding="utf-8") as handle:
        meta = json.load(handle)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{str(meta_file)!r} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def load_pretraining_data(path: str | Path, split: str = "train"):
    """The `split` ("train" or "heldout") as a `datasets.Dataset` in torch format."""
    import datasets

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    load_meta(path)
    return datasets.load_from_disk(str(Path(path) / split)).with_format("torch", columns=list(COLUMNS))


def collate(batch: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack rows into int64 tensors: [B, seq_len], [B, max_predictions] and [B]."""
    return {name: torch.stack([torch.as_tensor(row[name]) for row in batch]).long()
            for name in COLUMNS}


def to_hf_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Arguments of the stock `transformers.BertForPreTraining`: positions/ids -> `labels`."""
    return {
        "input_ids": batch["input_ids"],
        "token_type_ids": batch["token_type_ids"],
        "attention_mask": batch["attention_mask"],
        "labels": masked_to_labels(batch["masked_lm_positions"], batch["masked_lm_ids"],
                                   batch["input_ids"].shape[1]),
        "next_sentence_label": batch["next_sentence_label"],
    }


def remask(batch: Mapping[str, torch.Tensor], meta: Mapping, generator: torch.Generator | None = None
           ) -> dict[str, torch.Tensor]:
    """New masks for a collated batch, drawn like the static ones (token-level, no whole words).

    The stored masks are undone first (original ids go back to their positions), then
    min(P, max(1, round(0.15 * length))) non-[CLS]/[SEP] tokens are picked per row, 80% -> [MASK],
    10% -> a random id, 10% kept. Reproducible for a given generator state and batch order.
    """
    vocab, prob = meta["vocab"], meta["config"]["masked_lm_prob"]
    ids = batch["input_ids"].clone()
    old_pos = batch["masked_lm_positions"]
    batch_size, seq_len = ids.shape
    rows = torch.arange(batch_size).unsqueeze(1).expand_as(old_pos)
    stored = old_pos != 0
    ids[rows[stored], old_pos[stored]] = batch["masked_lm_ids"][stored]
    candidate = (batch["attention_mask"] == 1) & (ids != vocab["cls_id"]) & (ids != vocab["sep_id"])
    num_slots = old_pos.shape[1]
    length = batch["attention_mask"].sum(1).double()
    count = torch.round(length * prob).clamp(min=1, max=num_slots).long()
    scores = torch.rand(batch_size, seq_len, generator=generator).masked_fill(~candidate, 2.0)
    order = scores.argsort(dim=1)[:, :num_slots]
    take = (torch.arange(num_slots) < count.unsqueeze(1)) & candidate.gather(1, order)
    positions = torch.where(take, order, seq_len).sort(dim=1).values
    valid = positions < seq_len
    positions = torch.where(valid, positions, 0)
    labels = torch.where(valid, ids.gather(1, positions), 0)
    draw = torch.rand(batch_size, num_slots, generator=generator)
    random_ids = torch.randint(0, vocab["size"], (batch_size, num_slots), generator=generator)
    replacement = torch.where(draw < 0.8, vocab["mask_id"], torch.where(draw < 0.9, labels, random_ids))
    ids[rows[valid], positions[valid]] = replacement[valid]
    return {**batch, "input_ids": ids, "masked_lm_positions": positions, "masked_lm_ids": labels}


class DynamicMaskingCollator:
    """`collate` + `remask` with its own generator: fresh masks every time a row is batched."""

    def __init__(self, path: str | Path, seed: int = 0):
        self.meta = load_meta(path)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, batch: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return remask(collate(batch), self.meta, self.generator)
