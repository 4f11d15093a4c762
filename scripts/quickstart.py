"""`neva-quickstart` from a checkout: python scripts/quickstart.py ... (the code: nemo_neva/commands/quickstart.py)."""
import sys

from nemo_neva.commands.quickstart import *  # noqa: F401,F403  (tests import its functions from here)
from nemo_neva.commands.quickstart import main

if __name__ == "__main__":  # keep the guard: saving a .nemo starts spawn-context workers
    sys.exit(main())
