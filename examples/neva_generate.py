"""`neva-generate` from a checkout: python examples/neva_generate.py ... (the code: nemo_neva/commands/neva_generate.py)."""
from nemo_neva.commands.neva_generate import main

if __name__ == "__main__":  # keep the guard: saving a .nemo starts spawn-context workers
    main()
