"""Where a `.nemo` and a training checkpoint are written and read, and what is refused on the way in.

nemo_layout.py          the fixed names inside a `.nemo` (weights folder, marker file)
nemo_connector.py       NevaSaveRestoreConnector: `.nemo` = config + HF side files + megatron-core dist checkpoint
peft_files.py           what a PEFT `.nemo` stores, and the checked reference to its base `.nemo`
training_checkpoint.py  resumable Lightning checkpoints as megatron-core dist checkpoints (+ RNG, data position)
data_position.py        samples consumed -> where each data loader continues after a resume
untrusted.py            checks on untrusted archives, folders, configs and dist checkpoints before loading
"""
