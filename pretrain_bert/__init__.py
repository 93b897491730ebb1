"""BERT pretraining with the VR optimizers (data, model wrapper, run_pretraining, shared runtime);
SQuAD v1.1 fine-tuning in :mod:`pretrain_bert.squad`."""
