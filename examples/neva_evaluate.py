"""`neva-evaluate` from a checkout: python examples/neva_evaluate.py ... (the code: nemo_neva/commands/neva_evaluate.py)."""
from nemo_neva.commands.neva_evaluate import main

if __name__ == "__main__":  # keep the guard: saving a .nemo starts spawn-context workers
    main()
