"""The README's main job: tiny CPU pretrain -> finetune -> one answer, on the shipped demo data.

    neva-quickstart [--exp-dir nemo_experiments]      (`make demo` runs it from the checkout)

Runs the same commands a user would (neva-pretrain, neva-finetune, neva-generate), one after another, each in
its own process, so each stage is exercised end to end. Works from any folder: the demo data ships in the
package. Add --verbose (or NEVA_VERBOSE=1) for NeMo's full log.
"""
import argparse
import json
import os
import subprocess
import sys

from nemo_neva.cli import resolve_path


def run(module, *args, env=None):
    print(f"\n$ neva-{module.split('.')[-1].replace('neva_', '')} " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", module, *args], check=True, env=env)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exp-dir", default="nemo_experiments", help="where the two .nemo files and logs go")
    ap.add_argument("--verbose", action="store_true", help="NeMo's full log (same as NEVA_VERBOSE=1)")
    args = ap.parse_args(argv)
    env = {**os.environ, "NEVA_VERBOSE": "1"} if args.verbose else None
    exp = os.path.abspath(args.exp_dir)
    pre = os.path.join(exp, "neva_pretrain", "neva_pretrain.nemo")
    fin = os.path.join(exp, "neva_finetune", "neva_finetune.nemo")
    run("nemo_neva.commands.neva_pretrain", f"exp_manager.exp_dir={exp}", env=env)
    run("nemo_neva.commands.neva_finetune", f"exp_manager.exp_dir={exp}", f"model.restore_from_path={pre}", env=env)
    demo = resolve_path("data/shapes_demo")
    with open(os.path.join(demo, "eval.jsonl")) as f:
        sample = json.loads(f.readline())
    image = os.path.join(demo, "images", sample["image"])
    print(f"\nheld-out image {sample['image']}; reference answers: {sample['answers']}")
    run("nemo_neva.commands.neva_generate", f"neva_model_file={fin}", f"image_path={image}",
        f"prompt={sample['question']}", env=env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
