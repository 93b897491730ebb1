"""BERT pretraining and SQuAD fine-tuning with the VR optimizers: data, model wrapper, scripts."""
