"""`neva-convert-energon` from a checkout: python scripts/convert_llava_to_energon.py ... (the code: nemo_neva/commands/convert_llava_to_energon.py)."""
import sys

from nemo_neva.commands.convert_llava_to_energon import *  # noqa: F401,F403  (tests import its functions from here)
from nemo_neva.commands.convert_llava_to_energon import main

if __name__ == "__main__":  # keep the guard: saving a .nemo starts spawn-context workers
    sys.exit(main())
