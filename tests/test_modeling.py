"""BertForPreTrainingMasked against the stock BertForPreTraining on a tiny random model."""

from __future__ import annotations

import pytest
import torch
import transformers

from pretrain_bert.modeling import BertForPreTrainingMasked, bert_config, masked_to_labels

VOCAB, SEQ, SLOTS = 500, 32, 6


def make_batch(seed=0, batch=5):
    """Random ids, ~12% masked; row 1 has 3 padded slots, row 2 padded tokens, row 3 no masked token."""
    assert 3 <= batch <= 5
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, VOCAB, (batch, SEQ), generator=g)
    input_ids[:, 0] = 1                                          # [CLS]
    attention_mask = torch.ones(batch, SEQ, dtype=torch.long)
    attention_mask[2, 24:] = 0                                   # a padded sequence
    input_ids[2, 24:] = 0
    token_type_ids = torch.zeros(batch, SEQ, dtype=torch.long)
    token_type_ids[:, SEQ // 2:] = 1
    counts = [SLOTS, SLOTS - 3, 4, 0, SLOTS][:batch]
    positions = torch.zeros(batch, SLOTS, dtype=torch.long)
    ids = torch.zeros(batch, SLOTS, dtype=torch.long)
    for row, n in enumerate(counts):
        limit = int(attention_mask[row].sum())
        pos = 1 + torch.randperm(limit - 1, generator=g)[:n].sort().values
        positions[row, :n] = pos
        ids[row, :n] = input_ids[row, pos]
        input_ids[row, pos] = 4                                  # [MASK]
    nsp = torch.randint(0, 2, (batch,), generator=g)
    return dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                masked_lm_positions=positions, masked_lm_ids=ids, next_sentence_label=nsp)


def stock_inputs(b):
    return dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                token_type_ids=b["token_type_ids"], next_sentence_label=b["next_sentence_label"],
                labels=masked_to_labels(b["masked_lm_positions"], b["masked_lm_ids"], SEQ))


@pytest.fixture
def models():
    torch.manual_seed(0)
    config = bert_config("tiny", VOCAB, max_position_embeddings=64)
    stock = transformers.BertForPreTraining(config).eval()
    masked = BertForPreTrainingMasked(config).eval()
    masked.load_state_dict(stock.state_dict())
    return stock, masked


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_masked_to_labels():
    labels = masked_to_labels(torch.tensor([[3, 1, 0], [0, 0, 0]]), torch.tensor([[7, 8, 0], [0, 0, 0]]), 5)
    assert labels.tolist() == [[-100, 8, -100, 7, -100], [-100] * 5]


def test_loss_and_gradients_match_stock(models):
    stock, masked = models
    b = make_batch()
    assert int((b["masked_lm_positions"] != 0).sum()) == 19                  # 19 of 160 tokens, 12%

    ref = stock(**stock_inputs(b))
    ref.loss.backward()
    out = masked(**b)
    out.loss.backward()

    labels = stock_inputs(b)["labels"]
    ref_mlm = torch.nn.functional.cross_entropy(ref.prediction_logits.view(-1, VOCAB), labels.view(-1))
    torch.testing.assert_close(out.mlm_loss, ref_mlm, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.nsp_loss, ref.loss - ref_mlm, rtol=1e-5, atol=1e-6)
    # the logits of the valid slots are the stock logits at those positions
    valid = b["masked_lm_positions"] != 0
    rows = torch.arange(5).unsqueeze(1).expand_as(valid)
    torch.testing.assert_close(out.prediction_logits[valid],
                               ref.prediction_logits[rows[valid], b["masked_lm_positions"][valid]],
                               rtol=1e-5, atol=1e-5)

    g_ref, g_out = grads(stock), grads(masked)
    assert g_ref.keys() == g_out.keys() == {n for n, _ in stock.named_parameters()}
    for name in g_ref:
        torch.testing.assert_close(g_out[name], g_ref[name], rtol=1e-4, atol=1e-7, msg=name)
    # the head and the tied embedding get a gradient at all (the check above is not 0 == 0)
    assert g_out["cls.predictions.transform.dense.weight"].abs().sum() > 0
    assert g_out["bert.embeddings.word_embeddings.weight"].abs().sum() > 0


def test_labels_path_is_stock_forward(models):
    stock, masked = models
    b = make_batch(seed=1)
    ref, out = stock(**stock_inputs(b)), masked(**stock_inputs(b))
    assert type(out) is type(ref)
    assert torch.equal(out.loss, ref.loss)
    assert torch.equal(out.prediction_logits, ref.prediction_logits)
    assert torch.equal(out.seq_relationship_logits, ref.seq_relationship_logits)


def test_save_pretrained_loads_as_stock(models, tmp_path):
    _, masked = models
    masked.save_pretrained(tmp_path)
    loaded, info = transformers.BertForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    loaded.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert loaded.config.to_dict()["hidden_size"] == masked.config.hidden_size
    assert loaded.state_dict().keys() == masked.state_dict().keys()
    for name, value in masked.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    b = make_batch(seed=2)
    ref, out = loaded(**stock_inputs(b)), masked(**stock_inputs(b))
    assert torch.equal(out.loss, ref.loss) and torch.equal(out.prediction_logits, ref.prediction_logits)
    # the tie survives the round trip: the decoder is the word embedding
    assert loaded.cls.predictions.decoder.weight.data_ptr() == \
        loaded.bert.embeddings.word_embeddings.weight.data_ptr()
    # and a stock checkpoint loads into the masked model
    again = BertForPreTrainingMasked.from_pretrained(tmp_path).eval()
    assert torch.equal(again(**b).loss, masked(**b).loss)


def test_accuracy_counts_hand_made(models):
    _, masked = models
    with torch.no_grad():
        masked.cls.predictions.bias[7] = 1e4                   # every MLM prediction is token 7
        masked.cls.seq_relationship.bias.copy_(torch.tensor([1e4, 0.0]))  # every NSP guess is 0
    b = make_batch(batch=3)
    b["masked_lm_positions"] = torch.tensor([[3, 5, 9, 0], [2, 0, 0, 0], [0, 0, 0, 0]])
    b["masked_lm_ids"] = torch.tensor([[7, 7, 3, 0], [5, 0, 0, 0], [0, 0, 0, 0]])
    b["next_sentence_label"] = torch.tensor([0, 1, 0])
    out = masked(**b)
    assert (out.mlm_correct.item(), out.mlm_total.item(), out.nsp_correct.item()) == (2, 4, 2)
    assert out.prediction_logits.shape == (3, 4, VOCAB)


def test_no_masked_token_at_all(models):
    _, masked = models
    b = make_batch(batch=3)
    b["masked_lm_positions"].zero_()
    b["masked_lm_ids"].zero_()
    out = masked(**b)
    assert out.mlm_loss.item() == 0.0 and out.mlm_total.item() == 0 and out.mlm_correct.item() == 0
    out.loss.backward()
    assert torch.allclose(out.loss, out.nsp_loss)
    assert all(torch.isfinite(p.grad).all() for p in masked.parameters() if p.grad is not None)
    assert masked.cls.predictions.transform.dense.weight.grad.abs().sum() == 0


def test_without_nsp_labels(models):
    _, masked = models
    b = make_batch()
    b.pop("next_sentence_label")
    out = masked(**b)
    assert out.nsp_loss is None and out.nsp_correct is None and torch.equal(out.loss, out.mlm_loss)


def test_bad_arguments(models):
    _, masked = models
    b = make_batch()
    with pytest.raises(ValueError, match="either full-length labels or masked_lm_positions"):
        masked(**b, labels=stock_inputs(b)["labels"])
    with pytest.raises(ValueError, match=r"masked_lm_ids must have the shape .*\(5, 6\), got \(5, 5\)"):
        masked(**{**b, "masked_lm_ids": b["masked_lm_ids"][:, :5]})


def test_bert_config_sizes():
    shapes = {s: (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size)
              for s in ("tiny", "mini", "small", "base", "large") for c in [bert_config(s, 30522)]}
    assert shapes["base"] == (12, 768, 12, 3072) and shapes["large"] == (24, 1024, 16, 4096)
    assert shapes["tiny"] == (2, 128, 2, 512) and shapes["mini"] == (4, 256, 4, 1024)
    assert shapes["small"] == (4, 512, 8, 2048)
    assert bert_config("tiny", 100, max_position_embeddings=128).max_position_embeddings == 128
    with pytest.raises(ValueError, match=r"size must be one of tiny, mini, small, base, large, got 'huge'"):
        bert_config("huge", 30522)
