"""NeMo-Run front end: one training command, run under torchrun on this machine (LocalExecutor) or as a
Slurm batch job (SlurmExecutor, one torchrun per node inside the container), built from the same options.

Kept free of torch/NeMo imports (only nemo_run; `import nemo_neva` is lazy), so launching (`neva-launch`) does
not pay for importing the training stack.

The training script is the unchanged example (`examples/neva_pretrain.py` / `neva_finetune.py`) with the
user's hydra overrides; `trainer.devices` / `trainer.num_nodes` are set from the launch so that the
world size the script checks matches what is started.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
SCRIPTS = {"pretrain": "neva_pretrain.py", "finetune": "neva_finetune.py"}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="launch_neva.py",
        description="Launch NeVA training with NeMo-Run. Everything after `--` goes to the training script "
                    "as hydra overrides.",
    )
    p.add_argument("--executor", choices=("local", "slurm"), required=True)
    p.add_argument("--script", choices=sorted(SCRIPTS), default="pretrain")
    p.add_argument("--name", default=None, help="experiment name (default: neva_<script>)")
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="processes per node (local; on slurm defaults to --gpus-per-node)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=None, help="slurm: GPUs (= training processes) per node")
    p.add_argument("--container-image", default=None, help="slurm: container image (pyxis)")
    p.add_argument("--mounts", nargs="*", default=[], help="slurm: container mounts SRC:DST ...")
    p.add_argument("--account", default=None, help="slurm: account")
    p.add_argument("--partition", default=None, help="slurm: partition")
    p.add_argument("--time", default="04:00:00", help="slurm: wall time limit")
    p.add_argument("--job-dir", default=None,
                   help="where NeMo-Run keeps the experiment (scripts, logs); default ~/.nemo_run/experiments")
    p.add_argument("--repo-dir", default=None,
                   help="slurm: path of this repository inside the container (default: this checkout's path)")
    p.add_argument("--dryrun", action="store_true", help="print what would run (slurm: the sbatch script)")
    p.add_argument("overrides", nargs="*", help="hydra overrides for the training script (after --)")
    args = p.parse_args(argv)
    if args.nodes < 1:
        p.error("--nodes must be >= 1")
    if args.executor == "local":
        if args.nodes != 1:
            p.error("--executor local runs on this machine: --nodes must be 1")
        args.nproc_per_node = args.nproc_per_node or 1
    else:
        missing = [f"--{k.replace('_', '-')}" for k in ("gpus_per_node", "container_image", "account", "partition")
                   if not getattr(args, k)]
        if missing:
            p.error(f"--executor slurm needs {', '.join(missing)}")
        args.nproc_per_node = args.nproc_per_node or args.gpus_per_node
    if args.nproc_per_node < 1:
        p.error("--nproc-per-node must be >= 1")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        p.error(f"hydra overrides look like key=value; got {bad}")
    return args


def training_args(args: argparse.Namespace) -> list[str]:
    """The hydra overrides passed to the training script: the launch shape first, then the user's
    (the user's come last, but conflicting device counts are refused up front)."""
    launch = {"trainer.devices": str(args.nproc_per_node), "trainer.num_nodes": str(args.nodes)}
    for o in args.overrides:
        key, value = o.split("=", 1)
        if key in launch and value != launch[key]:
            raise ValueError(f"override {o} contradicts the launch ({key}={launch[key]}); drop it")
    return [f"{k}={v}" for k, v in launch.items()] + list(args.overrides)


def build_task(args: argparse.Namespace, repo_dir: Optional[str] = None):
    import nemo_run as run

    script = os.path.join(repo_dir or ROOT, "examples", SCRIPTS[args.script])
    if repo_dir is None and not os.path.isfile(script):  # an installed package, no checkout: the command module
        script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "commands",
                              SCRIPTS[args.script])
    return run.Script(path=script, entrypoint="python", args=training_args(args))


def build_executor(args: argparse.Namespace):
    import nemo_run as run

    if args.executor == "local":
        # NeMo-Run starts `torchrun` by name: use the one of this interpreter's environment
        bin_dir = os.path.dirname(sys.executable)
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
        return run.LocalExecutor(ntasks_per_node=args.nproc_per_node, launcher="torchrun",
                                 env_vars={"PYTHONPATH": _pythonpath(ROOT)})
    repo = args.repo_dir or ROOT
    job_dir = os.path.abspath(args.job_dir or os.path.join(os.path.expanduser("~"), ".nemo_run", "experiments"))
    return run.SlurmExecutor(
        account=args.account,
        partition=args.partition,
        nodes=args.nodes,
        ntasks_per_node=1,  # one torchrun agent per node starts the per-GPU workers
        gpus_per_node=args.gpus_per_node,
        torchrun_nproc_per_node=args.nproc_per_node,
        container_image=args.container_image,
        container_mounts=list(args.mounts),
        time=args.time,
        launcher="torchrun",
        env_vars={"PYTHONPATH": repo},
        tunnel=run.LocalTunnel(job_dir=job_dir),  # dry-run/submit from a login node: no SSH
        packager=run.Packager(),  # no code upload: the repository is at --repo-dir inside the container
    )


def _pythonpath(root: str) -> str:
    current = os.environ.get("PYTHONPATH")
    return f"{root}{os.pathsep}{current}" if current else root


def _dryrun_text(exp) -> str:
    """What would be submitted: the sbatch script (slurm) or the command (local), as plain text."""
    out = []
    for job in exp.jobs:
        request = job._dryrun_info.request
        out.append(request.materialize() if hasattr(request, "materialize") else str(job._dryrun_info))
    return "\n".join(out)


def launch(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        training_args(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import nemo_run as run  # after the checks: importing it takes seconds
    repo = args.repo_dir if args.executor == "slurm" else None
    task = build_task(args, repo)
    executor = build_executor(args)
    name = args.name or f"neva_{args.script}"
    base_dir = os.path.abspath(args.job_dir) if args.job_dir else None
    with run.Experiment(name, executor=executor, base_dir=base_dir) as exp:
        exp.add(task, name=name, tail_logs=not args.dryrun)
        if args.dryrun:
            exp.dryrun(log=False)
            print(_dryrun_text(exp))
            return 0
        exp.run(sequential=True, detach=args.executor == "slurm")
    if args.executor == "local":
        states = [str(getattr(job, "state", "")) for job in exp.jobs]
        ok = all(s.endswith("SUCCEEDED") for s in states)
        print(f"job state: {', '.join(states)}")
        return 0 if ok else 1
    return 0
