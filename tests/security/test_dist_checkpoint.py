"""Pickle paths inside the megatron-core dist checkpoint (`model_weights/` of a .nemo).

torch DCP reads `.metadata` with plain `pickle.load`, and every non-tensor ("bytes") item with
`torch.load(weights_only=False)`; megatron-core reads `common.pt` with `torch.load` (weights_only only by
torch's default). Each crafted payload below must be refused before any of those runs.
"""
import io
import json
import pickle

import pytest
import torch
from nemo.core import ModelPT
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from nemo_neva import MegatronNevaModel
from nemo_neva.checkpoint.untrusted import UnsafeCheckpointError
from tests.security.conftest import Payload, read_member, rewrite_nemo

W = "model_weights/"


def _torch_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _bytes_item_attack(tiny_nemo, marker):
    """Point one `_extra_state` bytes item of the real metadata at a torch.save'd payload."""
    meta = pickle.loads(read_member(tiny_nemo, W + ".metadata"))  # our own file: trusted here
    fqn = next(k for k, v in meta.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata))
    index = next(i for i in meta.storage_data if i.fqn == fqn)
    info = meta.storage_data[index]
    blob = read_member(tiny_nemo, W + info.relative_path)
    payload = _torch_bytes(Payload(marker))
    info.offset, info.length = len(blob), len(payload)
    return {W + ".metadata": pickle.dumps(meta), W + info.relative_path: blob + payload}, payload


def _attack(tiny_nemo, kind, marker):
    if kind == "metadata_pickle":
        return {W + ".metadata": pickle.dumps(Payload(marker))}
    if kind == "common_pt":
        return {W + "common.pt": _torch_bytes({"x": Payload(marker)})}
    if kind == "bytes_item":
        return _bytes_item_attack(tiny_nemo, marker)[0]
    if kind == "other_backend":
        return {W + "metadata.json": json.dumps({"sharded_backend": "zarr", "sharded_backend_version": 1,
                                                 "common_backend": "torch", "common_backend_version": 1}).encode()}
    if kind == "path_in_metadata":
        meta = pickle.loads(read_member(tiny_nemo, W + ".metadata"))
        next(iter(meta.storage_data.values())).relative_path = "../model_weights.ckpt"
        return {W + ".metadata": pickle.dumps(meta)}
    raise ValueError(kind)


@pytest.mark.parametrize("kind,route", [
    ("metadata_pickle", "neva"), ("metadata_pickle", "generic"), ("common_pt", "neva"),
    ("bytes_item", "neva"), ("bytes_item", "generic"), ("other_backend", "neva"), ("path_in_metadata", "neva"),
])
def test_dist_checkpoint_payload_is_refused(tiny_nemo, tmp_path, monkeypatch, kind, route):
    marker = tmp_path / "dist_marker"
    bad = rewrite_nemo(tiny_nemo, str(tmp_path / "d.nemo"), replace=_attack(tiny_nemo, kind, marker))
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch's escape hatch changes nothing
    restore = MegatronNevaModel.restore_from if route == "neva" else ModelPT.restore_from
    with pytest.raises(UnsafeCheckpointError, match="refusing checkpoint"):
        restore(bad)
    assert not marker.exists()


def test_metadata_payload_is_live_for_torch_dcp(tiny_nemo, tmp_path):
    """Without our check, torch DCP's own reader runs the `.metadata` payload (this is why we check)."""
    from torch.distributed.checkpoint import FileSystemReader

    marker = tmp_path / "live_marker"
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    try:
        FileSystemReader(str(tmp_path / "ck")).read_metadata()
    except Exception:
        pass  # the payload returns a file object, not Metadata: it has already run
    assert marker.exists()


def test_bytes_item_payload_is_live_for_torch_dcp(tiny_nemo, tmp_path):
    """DCP's DefaultLoadPlanner.load_bytes does torch.load(weights_only=False) on these very bytes."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    marker = tmp_path / "live_marker"
    _, payload = _bytes_item_attack(tiny_nemo, marker)

    class Item:
        class dest_index:
            fqn = "x"

    planner = DefaultLoadPlanner(flatten_state_dict=False)
    planner.state_dict = {}
    planner.load_bytes(Item, io.BytesIO(payload))
    assert marker.exists()
