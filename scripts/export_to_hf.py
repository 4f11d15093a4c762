"""`neva-export-hf` from a checkout: python scripts/export_to_hf.py ... (the code: nemo_neva/commands/export_to_hf.py)."""
import sys

from nemo_neva.commands.export_to_hf import main

if __name__ == "__main__":  # keep the guard: saving a .nemo starts spawn-context workers
    sys.exit(main())
