"""Launch NeVA training with NeMo-Run, locally under torchrun or on Slurm.

    python scripts/launch_neva.py --executor local --nproc-per-node 2 [--script pretrain|finetune] -- \
        trainer.max_steps=100 exp_manager.exp_dir=/tmp/neva
    python scripts/launch_neva.py --executor slurm --nodes 2 --gpus-per-node 8 --container-image IMG \
        --account A --partition P --mounts /lustre:/lustre --dryrun -- trainer.max_steps=1000

See nemo_neva/training/launch.py and the README ("Launching with NeMo-Run").
"""
import importlib.util
import os
import sys

if __name__ == "__main__":
    # Load nemo_neva/training/launch.py on its own: importing the nemo_neva package would import the whole
    # training stack (torch, NeMo, megatron-core), which the launcher does not need.
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nemo_neva", "training",
                        "launch.py")
    spec = importlib.util.spec_from_file_location("nemo_neva_launch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.exit(module.launch())
