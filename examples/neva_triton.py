"""`neva-triton` from a checkout: python examples/neva_triton.py ... (the code: nemo_neva/commands/neva_triton.py)."""
from nemo_neva.commands.neva_triton import main

if __name__ == "__main__":  # keep the guard: saving a .nemo starts spawn-context workers
    main()
