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


# NevaProcessor's keyword arguments (besides the tokenizer and image processor) a test may give
PROCESSOR_ARGS = {"tokens_per_image", "tokens_per_frame", "image_aspect_ratio", "tiling"}


def dataset_groups(tok, proc, **kw):
    """(NevaProcessor, DatasetSettings, the rest) from keyword arguments named as the processor's arguments and
    the settings' fields (the rest: a dataset's own arguments, e.g. ShardedNevaDataset's dp_rank / shuffle).
    `proc` is the tower's HF image processor (with `tiling`, the processor makes the tiling one from it)."""
    from dataclasses import fields

    from nemo_neva.data.processor import NevaProcessor
    from nemo_neva.data.settings import DatasetSettings

    st = {f.name for f in fields(DatasetSettings)}
    processor = NevaProcessor(tok, proc, **{k: v for k, v in kw.items() if k in PROCESSOR_ARGS})
    settings = DatasetSettings(**{k: v for k, v in kw.items() if k in st})
    return processor, settings, {k: v for k, v in kw.items() if k not in PROCESSOR_ARGS | st}


def json_dataset(path, image_folder, tok, proc, **kw):
    """NevaDataset over `path` with its images under `image_folder` (see dataset_groups for `kw`)."""
    from nemo_neva.data.dataset import NevaDataset

    processor, settings, rest = dataset_groups(tok, proc, image_folder=image_folder, **kw)
    return NevaDataset(path, processor, settings, **rest)


def shard_dataset(shards, tok, proc, **kw):
    """ShardedNevaDataset over `shards` (see dataset_groups for `kw`)."""
    from nemo_neva.data.shards import ShardedNevaDataset

    processor, settings, rest = dataset_groups(tok, proc, **kw)
    return ShardedNevaDataset(shards, processor, settings, **rest)
