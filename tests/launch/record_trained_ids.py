"""Runs a script (an example, or kill_during_save.py and its example) exactly as `python <script> <args>`
would, and appends one JSON line per trained batch to $NEVA_TEST_TRAINED_IDS: the step it trained, the
epoch, and the sample ids of its rows. Test helper for the packed-shard resume test: which samples a run
trained on is otherwise not observable from outside."""
import json
import os

from nemo_neva.models.neva_model import MegatronNevaModel
from script_wrapper import run_script_from_argv  # a sibling: run as a script, this folder is on sys.path


def main():
    path, train = os.environ["NEVA_TEST_TRAINED_IDS"], MegatronNevaModel.training_step

    def recording(self, batch, batch_idx):
        step, epoch = int(self.trainer.global_step), int(self.trainer.current_epoch)
        loss = train(self, batch, batch_idx)
        ids = [i for row in batch["ids"] for i in (row if isinstance(row, (list, tuple)) else [row])]
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step + 1, "epoch": epoch, "ids": ids}) + "\n")
        return loss

    MegatronNevaModel.training_step = recording
    run_script_from_argv()


if __name__ == "__main__":  # the dist-checkpoint writer re-imports __main__ in a spawned helper
    main()
