"""`neva-pretrain` from a checkout: python examples/neva_pretrain.py ... (the code: nemo_neva/commands/neva_pretrain.py)."""
from nemo_neva.commands.neva_pretrain import main

if __name__ == "__main__":  # keep the guard: saving a .nemo starts spawn-context workers
    main()
