"""`neva-peft` from a checkout: python examples/neva_peft.py ... (the code: nemo_neva/commands/neva_peft.py)."""
from nemo_neva.commands.neva_peft import main

if __name__ == "__main__":  # keep the guard: saving a .nemo starts spawn-context workers
    main()
