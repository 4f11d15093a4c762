"""`neva-convert-shards` from a checkout: python scripts/convert_llava_to_shards.py ... (the code: nemo_neva/commands/convert_llava_to_shards.py)."""
import sys

from nemo_neva.commands.convert_llava_to_shards import main

if __name__ == "__main__":  # keep the guard: saving a .nemo starts spawn-context workers
    sys.exit(main())
