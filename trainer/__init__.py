"""Training for CPM models: data formats -> token windows -> fine-tune / distill -> HF checkpoints.

Library entry points: :func:`trainer.finetune.finetune`, :func:`trainer.distill.distill`,
:func:`trainer.sp_train.train_tokenizer`. The CLI wraps them as ``cpm train`` and ``cpm tokenizer``.
Everything here logs; only the CLI prints.
"""
