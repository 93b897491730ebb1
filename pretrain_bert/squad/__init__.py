"""SQuAD v1.1 fine-tuning of a BERT checkpoint: :mod:`.data` (examples, windowed features, n-best
post-processing), :mod:`.metric` (the official evaluation, ``python -m pretrain_bert.squad.metric``)
and :mod:`.run` (the DeepSpeed fine-tuning script, ``launch/run_squad.sh``)."""
