"""The NeMo model: `MegatronNevaModel` (a `nemo.core.ModelPT`, neva_model.py) and PEFT on it (peft.py).
The network it wraps is in `nemo_neva.modules`; `.nemo` files are written by `nemo_neva.checkpoint`."""
