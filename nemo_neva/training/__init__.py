"""Training: one step through megatron-core, driven from Lightning. The parallel layout it runs in is
decided in `nemo_neva.parallel`.

neva_step.py      MegatronNevaModel's step (a mixin): batch -> micro-batches -> schedule -> loss; validation; optimizer
megatron_step.py  the step's pieces: micro-batch splitting and padding, loss sums, LR schedule, optimizer adapter
schedule.py       megatron-core's forward-backward schedules (no pipelining or 1F1B), CPU-safe
optimizer.py      megatron-core DDP (optionally the distributed optimizer) and its optimizer
trainer.py        the Lightning trainer and strategies the examples build from `trainer:` / `exp_manager:`
launch.py         NeMo-Run front end (torchrun locally or Slurm); imports no torch (`neva-launch`)
"""
