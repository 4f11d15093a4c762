"""`neva-finetune` from a checkout: python examples/neva_finetune.py ... (the code: nemo_neva/commands/neva_finetune.py)."""
from nemo_neva.commands.neva_finetune import main

if __name__ == "__main__":  # keep the guard: saving a .nemo starts spawn-context workers
    main()
