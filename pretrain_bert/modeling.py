"""BERT for pretraining with the MLM head run on the masked positions only.

The stock `transformers.BertForPreTraining` runs the MLM head (dense + GELU + LayerNorm and the
[H, vocab] decoder tied to the word embeddings) on every token, although only ~15% of them carry a
label. `BertForPreTrainingMasked` takes the masked positions the way NVIDIA's DeepLearningExamples
BERT data stores them and runs the same head on those slots alone. It adds no module and no
weight: its `save_pretrained` output is a plain BERT checkpoint that
`transformers.BertForPreTraining.from_pretrained` loads unchanged.

Masked-position format (NVIDIA / original TF BERT hdf5 files):

- `masked_lm_positions` [B, P]: indices into the sequence, 0-padded at the end of each row;
- `masked_lm_ids` [B, P]: the original token ids at those positions, 0-padded.

A slot is a prediction target iff `masked_lm_positions != 0`: position 0 holds [CLS], which is
never masked, so 0 is free to mean padding, and the positions are what the files pad explicitly
(ids would do too, [PAD] = 0 is never a target, but they are not used for this).

The head runs on all B * P slots, padded ones included, so every shape is fixed by (B, P) and no
`nonzero()` forces a host sync (NVIDIA compacts to [n_masked, H] instead). Padded slots gather
[CLS], their logits are computed and ignored: with P ~ 0.15 S and real data nearly full, that is a
few per cent of the masked head's cost, and their gradient is exactly zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from transformers.utils import ModelOutput

# (layers, hidden, heads); intermediate is 4 * hidden as in the BERT paper.
BERT_SIZES = {
    "tiny": (2, 128, 2),
    "mini": (4, 256, 4),
    "small": (4, 512, 8),
    "base": (12, 768, 12),
    "large": (24, 1024, 16),
}


def bert_config(size: str, vocab_size: int, max_position_embeddings: int = 512,
                **overrides) -> transformers.BertConfig:
    """A `BertConfig` of a named size (tiny, mini, small, base, large); `overrides` go to BertConfig."""
    if size not in BERT_SIZES:
        raise ValueError(f"size must be one of {', '.join(BERT_SIZES)}, got {size!r}")
    layers, hidden, heads = BERT_SIZES[size]
    return transformers.BertConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=4 * hidden,
        max_position_embeddings=max_position_embeddings, **overrides)


@dataclass
class BertMaskedPreTrainingOutput(ModelOutput):
    """Losses and accuracy counts of `BertForPreTrainingMasked` on masked positions.

    The counts are 0-dim tensors left on the device (no host sync); sum them over a held-out set
    and divide: MLM accuracy = sum mlm_correct / sum mlm_total, NSP accuracy = sum nsp_correct / N.
    """

    loss: torch.Tensor | None = None                     # mlm_loss + nsp_loss (mlm_loss without NSP labels)
    mlm_loss: torch.Tensor | None = None                 # mean over the masked tokens of the batch
    nsp_loss: torch.Tensor | None = None                 # mean over the batch; None without NSP labels
    mlm_correct: torch.Tensor | None = None              # masked tokens whose argmax is the original id
    mlm_total: torch.Tensor | None = None                # masked tokens in the batch
    nsp_correct: torch.Tensor | None = None              # sequences whose NSP argmax is the label
    prediction_logits: torch.Tensor | None = None        # [B, P, vocab], padded slots included
    seq_relationship_logits: torch.Tensor | None = None  # [B, 2]


class BertForPreTrainingMasked(transformers.BertForPreTraining):
    """`BertForPreTraining` whose MLM head runs only on `masked_lm_positions`.

    Called with `masked_lm_positions` and `masked_lm_ids` (format in the module docstring) it
    returns a `BertMaskedPreTrainingOutput`; the loss is the stock one (mean cross entropy over
    the masked tokens plus the NSP cross entropy), and so are its gradients. A batch with no masked
    token at all gets mlm_loss 0 rather than the stock 0/0 = nan.

    Called without `masked_lm_positions` (e.g. with full-length `labels`, -100 where unmasked) it
    is exactly `BertForPreTraining.forward`.
    """

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, next_sentence_label=None, masked_lm_positions=None,
                masked_lm_ids=None, **kwargs):
        if masked_lm_positions is None:
            if masked_lm_ids is not None:
                raise ValueError("masked_lm_ids needs masked_lm_positions, got only masked_lm_ids")
            return super().forward(input_ids, attention_mask=attention_mask,
                                   token_type_ids=token_type_ids, position_ids=position_ids,
                                   inputs_embeds=inputs_embeds, labels=labels,
                                   next_sentence_label=next_sentence_label, **kwargs)
        if labels is not None:
            raise ValueError("pass either full-length labels or masked_lm_positions/masked_lm_ids, not both")
        if masked_lm_ids is None or masked_lm_ids.shape != masked_lm_positions.shape:
            got = None if masked_lm_ids is None else tuple(masked_lm_ids.shape)
            raise ValueError(f"masked_lm_ids must have the shape of masked_lm_positions "
                             f"{tuple(masked_lm_positions.shape)}, got {got}")

        outputs = self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                            position_ids=position_ids, inputs_embeds=inputs_embeds, return_dict=True,
                            **kwargs)
        sequence_output, pooled_output = outputs[:2]
        hidden = sequence_output.shape[-1]
        index = masked_lm_positions.long().unsqueeze(-1).expand(-1, -1, hidden)
        masked_output = torch.gather(sequence_output, 1, index)           # [B, P, H]
        prediction_logits = self.cls.predictions(masked_output)           # [B, P, vocab]
        seq_relationship_logits = self.cls.seq_relationship(pooled_output)

        valid = masked_lm_positions != 0
        mlm_total = valid.sum()
        targets = torch.where(valid, masked_lm_ids.long(), -100)
        # sum / count instead of mean: the same loss and gradient, and 0 (not nan) with no target
        mlm_loss = F.cross_entropy(prediction_logits.reshape(-1, prediction_logits.shape[-1]).float(),
                                   targets.reshape(-1), ignore_index=-100, reduction="sum")
        mlm_loss = mlm_loss / mlm_total.clamp(min=1)
        mlm_correct = ((prediction_logits.argmax(-1) == masked_lm_ids) & valid).sum()

        nsp_loss = nsp_correct = None
        loss = mlm_loss
        if next_sentence_label is not None:
            nsp_loss = F.cross_entropy(seq_relationship_logits.view(-1, 2).float(),
                                       next_sentence_label.view(-1))
            nsp_correct = (seq_relationship_logits.argmax(-1) == next_sentence_label.view(-1)).sum()
            loss = mlm_loss + nsp_loss

        return BertMaskedPreTrainingOutput(
            loss=loss, mlm_loss=mlm_loss, nsp_loss=nsp_loss, mlm_correct=mlm_correct,
            mlm_total=mlm_total, nsp_correct=nsp_correct, prediction_logits=prediction_logits,
            seq_relationship_logits=seq_relationship_logits)


def masked_to_labels(masked_lm_positions: torch.Tensor, masked_lm_ids: torch.Tensor,
                     seq_len: int) -> torch.Tensor:
    """Full-length stock `labels` [B, S] (-100 where unmasked) from positions/ids in NVIDIA's format."""
    labels = torch.full((masked_lm_positions.shape[0], seq_len), -100, dtype=torch.long,
                        device=masked_lm_positions.device)
    valid = masked_lm_positions != 0
    rows = torch.arange(masked_lm_positions.shape[0], device=labels.device)
    rows = rows.unsqueeze(1).expand_as(masked_lm_positions)
    labels[rows[valid], masked_lm_positions[valid].long()] = masked_lm_ids[valid].long()
    return labels
