"""Performance arithmetic: paper_model.py (parameter counts, per-GPU memory, expected throughput; no torch)
and mfu.py (model-FLOPs utilisation of real training steps)."""
