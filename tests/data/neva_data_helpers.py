"""Helpers shared by the data tests (a uniquely named module: conftest names collide across dirs)."""
import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_TOKENIZER = os.path.join(REPO, "data", "tokenizer")


def write_json(path, records, jsonl=False):
    with open(path, "w") as f:
        if jsonl:
            for r in records:
                f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
        else:
            json.dump(records, f)
    return str(path)


def conv(*pairs):
    """conv("q1", "a1", "q2", "a2") -> LLaVA turns."""
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(pairs)]


def placeholder_runs(ids, image_id):
    """(start, end) of each run of image placeholders in a 1-D id tensor."""
    out = []
    for p in (ids == image_id).nonzero().flatten().tolist():
        if out and out[-1][1] == p:
            out[-1][1] = p + 1
        else:
            out.append([p, p + 1])
    return [tuple(r) for r in out]
