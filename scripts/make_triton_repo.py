"""`neva-triton-repo` from a checkout: python scripts/make_triton_repo.py ... (the code:
nemo_neva/commands/make_triton_repo.py)."""
import sys

from nemo_neva.commands.make_triton_repo import main

if __name__ == "__main__":
    sys.exit(main())
