"""`neva-query-triton` from a checkout: python scripts/query_triton.py ... (the code: nemo_neva/commands/query_triton.py)."""
import sys

from nemo_neva.commands.query_triton import *  # noqa: F401,F403  (tests import its functions from here)
from nemo_neva.commands.query_triton import main

if __name__ == "__main__":  # keep the guard: saving a .nemo starts spawn-context workers
    sys.exit(main())
