"""`neva-merge-lora` from a checkout: python scripts/merge_lora.py ... (the code: nemo_neva/commands/merge_lora.py)."""
import sys

from nemo_neva.commands.merge_lora import main

if __name__ == "__main__":  # keep the guard: saving a .nemo starts spawn-context workers
    sys.exit(main())
