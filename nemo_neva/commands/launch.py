"""`neva-launch`: NeVA training under NeMo-Run, locally under torchrun or on Slurm (nemo_neva/training/launch.py).

    neva-launch --executor local --nproc-per-node 2 [--script pretrain|finetune] -- \
        trainer.max_steps=100 exp_manager.exp_dir=/tmp/neva
    neva-launch --executor slurm --nodes 2 --gpus-per-node 8 --container-image IMG \
        --account A --partition P --mounts /lustre:/lustre --dryrun -- trainer.max_steps=1000

Needs the `launch` extra (pip install nemo_neva[launch]). Importing nemo_neva is cheap (no torch / NeMo), so
launching does not pay for the training stack.
"""
import sys


def main(argv=None) -> int:
    from nemo_neva.training.launch import launch

    return launch(argv)


if __name__ == "__main__":
    sys.exit(main())
