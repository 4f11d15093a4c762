"""The README's main job: tiny CPU pretrain -> finetune -> one answer, on the shipped demo data.

Runs the same commands a user would, one after another, so each stage is exercised end to end.
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXP = os.path.join(ROOT, "nemo_experiments")


def run(*args):
    print("\n$ " + " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)


def main():
    pre = os.path.join(EXP, "neva_pretrain", "neva_pretrain.nemo")
    fin = os.path.join(EXP, "neva_finetune", "neva_finetune.nemo")
    run("examples/neva_pretrain.py", f"exp_manager.exp_dir={EXP}")
    run("examples/neva_finetune.py", f"exp_manager.exp_dir={EXP}", f"model.restore_from_path={pre}")
    with open(os.path.join(ROOT, "data", "shapes_demo", "eval.jsonl")) as f:
        sample = json.loads(f.readline())
    image = os.path.join(ROOT, "data", "shapes_demo", "images", sample["image"])
    print(f"\nheld-out image {sample['image']}; reference answers: {sample['answers']}")
    run("examples/neva_generate.py", f"neva_model_file={fin}", f"image_path={image}",
        f"prompt={sample['question']}")


if __name__ == "__main__":
    main()
