"""Regenerate the shipped demo data (data/shapes_demo/) and tokenizer (data/tokenizer/)."""
import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # runnable from a checkout without `pip install -e .`


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data-dir", default=os.path.join(REPO, "data", "shapes_demo"))
    p.add_argument("--tokenizer-dir", default=os.path.join(REPO, "data", "tokenizer"))
    p.add_argument("--n-train", type=int, default=300)
    p.add_argument("--n-eval", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--image-size", type=int, default=32)
    a = p.parse_args(argv)
    from nemo_neva.data.demo import make_demo

    paths = make_demo(a.data_dir, a.tokenizer_dir, a.n_train, a.n_eval, a.seed, a.vocab_size, a.image_size)
    for key, path in paths.items():
        print(f"{key}: {path}")


if __name__ == "__main__":
    main()
