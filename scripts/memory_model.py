"""`neva-memory-model` from a checkout: python scripts/memory_model.py ... (the code: nemo_neva/commands/memory_model.py)."""
from nemo_neva.commands.memory_model import *  # noqa: F401,F403  (tests import its functions from here)
from nemo_neva.commands.memory_model import main

if __name__ == "__main__":  # keep the guard: saving a .nemo starts spawn-context workers
    main()
