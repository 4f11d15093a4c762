"""Training glue: megatron-core's DDP / optimizer / schedules under Lightning, the trainer, and launching.

megatron_step.py  one training step through megatron-core (micro-batches, DDP, optimizer, LR schedule, loss)
trainer.py        the Lightning trainer and strategies the examples build from `trainer:` / `exp_manager:`
launch.py         NeMo-Run front end (torchrun locally or Slurm); imports no torch (`neva-launch`)
"""
