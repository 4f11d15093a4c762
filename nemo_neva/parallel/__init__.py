"""The parallel layout: torch.distributed and megatron-core's TP / PP / DP groups (`init.setup_parallel`, called
once by an entry point before a model is built), and distributed checkpoints that load at any layout
(`dist_ckpt`). How one step runs in that layout is `nemo_neva.training`."""
