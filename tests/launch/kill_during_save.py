"""Runs an example script exactly as `python examples/<script> <overrides>` would, except that the process
SIGKILLs itself while writing the first training checkpoint at or after step $NEVA_TEST_KILL_AT_STEP: the
new checkpoint's files are on disk in its temporary folder, not yet renamed into place. Test helper for
tests/launch/test_resume.py (a crash in the middle of a save, the worst moment to die)."""
import os
import signal

import torch
from script_wrapper import run_script_from_argv  # a sibling: run as a script, this folder is on sys.path

from nemo_neva.checkpoint import training_checkpoint as checkpointing


def main():
    kill_at = int(os.environ["NEVA_TEST_KILL_AT_STEP"])
    publish = checkpointing._publish

    def publish_or_die(tmp, final):
        state = torch.load(os.path.join(tmp, checkpointing.TRAINER_STATE), weights_only=True)
        if state["global_step"] >= kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        publish(tmp, final)

    checkpointing._publish = publish_or_die
    run_script_from_argv()


if __name__ == "__main__":  # the dist-checkpoint writer re-imports __main__ in a spawned helper
    main()
