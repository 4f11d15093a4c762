"""`neva-launch` from a checkout: python scripts/launch_neva.py ... (the code: nemo_neva/commands/launch.py)."""
import sys

from nemo_neva.commands.launch import main

if __name__ == "__main__":
    sys.exit(main())
