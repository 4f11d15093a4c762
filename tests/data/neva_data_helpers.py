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


def dataset_groups(tok, proc, **kw):
    """(RecordEncoding, DatasetSettings, the rest) from keyword arguments named as those dataclasses' fields
    (the rest: a dataset's own arguments, e.g. ShardedNevaDataset's dp_rank / shuffle)."""
    from dataclasses import fields

    from nemo_neva.data.settings import DatasetSettings, RecordEncoding

    enc, st = {f.name for f in fields(RecordEncoding)}, {f.name for f in fields(DatasetSettings)}
    encoding = RecordEncoding(tok, proc, **{k: v for k, v in kw.items() if k in enc})
    settings = DatasetSettings(**{k: v for k, v in kw.items() if k in st})
    return encoding, settings, {k: v for k, v in kw.items() if k not in enc | st}


def json_dataset(path, image_folder, tok, proc, **kw):
    """NevaDataset over `path` with its images under `image_folder` (see dataset_groups for `kw`)."""
    from nemo_neva.data.dataset import NevaDataset

    encoding, settings, rest = dataset_groups(tok, proc, image_folder=image_folder, **kw)
    return NevaDataset(path, encoding, settings, **rest)


def shard_dataset(shards, tok, proc, **kw):
    """ShardedNevaDataset over `shards` (see dataset_groups for `kw`)."""
    from nemo_neva.data.shards import ShardedNevaDataset

    encoding, settings, rest = dataset_groups(tok, proc, **kw)
    return ShardedNevaDataset(shards, encoding, settings, **rest)
