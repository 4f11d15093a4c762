"""`neva-serve` from a checkout: python examples/neva_serve.py ... (the code: nemo_neva/commands/neva_serve.py)."""
from nemo_neva.commands.neva_serve import main

if __name__ == "__main__":  # keep the guard: saving a .nemo starts spawn-context workers
    main()
