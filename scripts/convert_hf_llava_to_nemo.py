"""`neva-convert-hf` from a checkout: python scripts/convert_hf_llava_to_nemo.py ... (the code: nemo_neva/commands/convert_hf_llava_to_nemo.py)."""
import sys

from nemo_neva.commands.convert_hf_llava_to_nemo import main

if __name__ == "__main__":  # keep the guard: saving a .nemo starts spawn-context workers
    sys.exit(main())
