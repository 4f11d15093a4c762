"""Crafted .nemo archives: members escaping the extraction folder, foreign config targets, pickled payloads
in model_weights.ckpt. Each is refused with a clear error, and nothing lands outside the extraction folder."""
import os
import pickle
import tarfile

import pytest
import torch
from nemo.core import ModelPT
from nemo.core.classes.common import UnsafeTargetError

from nemo_neva import MegatronNevaModel
from nemo_neva.checkpoint.untrusted import UnsafeCheckpointError
from tests.security.conftest import Payload, files_under, read_member, rewrite_nemo


def _file(name, data=b"pwned"):
    return tarfile.TarInfo(name), data


def _link(name, target, kind=tarfile.SYMTYPE):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def _attacks(jail):
    outside = jail / "outside"
    outside.mkdir()
    chr_dev = tarfile.TarInfo("tokenizer/null")
    chr_dev.type, chr_dev.devmajor, chr_dev.devminor = tarfile.CHRTYPE, 1, 3
    return {
        "dotdot": [_file("../../dotdot_marker.txt")],
        "dotdot_inside": [_file("tokenizer/../../../dotdot_inside_marker.txt")],
        "absolute": [_file(str(jail / "absolute_marker.txt"))],
        "symlink_dir": [_link("tokenizer/out", str(outside)), _file("tokenizer/out/through_link.txt")],
        "symlink_file": [_link("vision_config/passwd", "/etc/passwd")],
        "hardlink": [_link("vision_config/hard", "/etc/passwd", tarfile.LNKTYPE)],
        "device": [(chr_dev, None)],
    }


ATTACKS = ["dotdot", "dotdot_inside", "absolute", "symlink_dir", "symlink_file", "hardlink", "device"]


def _assert_nothing_escaped(jail):
    # Only what the test itself created: the extraction parent (a/b/, emptied by NeMo) and outside/.
    assert files_under(jail) == [], files_under(jail)
    assert not os.path.exists("dotdot_marker.txt")


@pytest.mark.parametrize("attack", ATTACKS)
def test_neva_restore_refuses_unsafe_members_before_extracting(tiny_nemo, jail, attack):
    bad = rewrite_nemo(tiny_nemo, str(jail / "a" / f"{attack}.nemo"), extra=_attacks(jail)[attack])
    with pytest.raises(UnsafeCheckpointError, match="unsafe member"):
        MegatronNevaModel.restore_from(bad)
    os.remove(bad)
    _assert_nothing_escaped(jail)
    assert os.listdir(jail / "a" / "b") == []  # refused before NeMo created its extraction folder


@pytest.mark.parametrize("attack", ["dotdot", "absolute", "symlink_dir"])
def test_generic_modelpt_restore_refuses_unsafe_members(tiny_nemo, jail, attack):
    """NeMo's own extractor only skips these members (with a warning); our constructor re-scans the archive."""
    bad = rewrite_nemo(tiny_nemo, str(jail / "a" / f"{attack}.nemo"), extra=_attacks(jail)[attack])
    with pytest.raises(UnsafeCheckpointError, match="unsafe member"):
        ModelPT.restore_from(bad)
    os.remove(bad)
    _assert_nothing_escaped(jail)


def test_duplicate_member_is_refused(tiny_nemo, jail):
    """A second model_config.yaml would replace the one that was checked when extracted."""
    cfg = read_member(tiny_nemo, "model_config.yaml")
    bad = rewrite_nemo(tiny_nemo, str(jail / "dup.nemo"), extra=[_file("model_config.yaml", cfg)])
    with pytest.raises(UnsafeCheckpointError, match="duplicate"):
        MegatronNevaModel.restore_from(bad)


def test_pre_extracted_folder_with_symlink_is_refused(tiny_nemo, tmp_path):
    from nemo_neva.checkpoint.nemo_connector import NevaSaveRestoreConnector

    folder = tmp_path / "extracted"
    with tarfile.open(tiny_nemo) as tar:
        tar.extractall(folder, filter="data")
    os.symlink("/etc/passwd", folder / "tokenizer" / "vocab.txt")
    conn = NevaSaveRestoreConnector()
    conn.model_extracted_dir = str(folder)
    with pytest.raises(UnsafeCheckpointError, match="symbolic link"):
        MegatronNevaModel.restore_from(str(folder), save_restore_connector=conn)


# ---------------------------------------------------------------------------------------- config target
def _with_target(tiny_nemo, dst, target, extra_yaml=""):
    cfg = read_member(tiny_nemo, "model_config.yaml").decode()
    cfg = cfg.replace("target: nemo_neva.models.neva_model.MegatronNevaModel", f"target: {target}") + extra_yaml
    return rewrite_nemo(tiny_nemo, dst, replace={"model_config.yaml": cfg.encode()})


FOREIGN = ["os.system", "subprocess.Popen", "torch.nn.Linear", "nemo.core.classes.modelPT.ModelPT",
           "nemo_neva.modules.projector.build_projector"]


@pytest.mark.parametrize("target", FOREIGN)
def test_neva_restore_refuses_foreign_target_before_instantiating(tiny_nemo, tmp_path, monkeypatch, target):
    def never(*a, **k):
        raise AssertionError("a class was instantiated from an unchecked config")

    monkeypatch.setattr(MegatronNevaModel, "from_config_dict", classmethod(never))
    bad = _with_target(tiny_nemo, str(tmp_path / "t.nemo"), target)
    with pytest.raises(UnsafeCheckpointError, match="is not 'nemo_neva.models.neva_model.MegatronNevaModel'"):
        MegatronNevaModel.restore_from(bad)


def test_neva_restore_refuses_hydra_target_inside_config(tiny_nemo, tmp_path):
    bad = _with_target(tiny_nemo, str(tmp_path / "t.nemo"), "nemo_neva.models.neva_model.MegatronNevaModel",
                       extra_yaml="extra:\n  _target_: os.system\n  command: touch pwned\n")
    with pytest.raises(UnsafeCheckpointError, match="extra._target_"):
        MegatronNevaModel.restore_from(bad)
    assert not os.path.exists("pwned")


@pytest.mark.parametrize("target", ["os.system", "subprocess.Popen"])
def test_generic_restore_refuses_code_targets(tiny_nemo, tmp_path, target):
    """NeMo's own allow-list already blocks these on the generic route (ours is not even consulted)."""
    bad = _with_target(tiny_nemo, str(tmp_path / "t.nemo"), target)
    with pytest.raises(UnsafeTargetError, match="unsafe target"):
        ModelPT.restore_from(bad)


# ---------------------------------------------------------------------------------------- weights pickle
def test_payload_is_live(tmp_path):
    """Sanity: the payload really runs when unpickled without restrictions."""
    marker = tmp_path / "live"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("route", ["neva", "generic"])
def test_pickle_payload_in_weights_ckpt_is_refused(tiny_nemo, tmp_path, route, monkeypatch):
    marker = tmp_path / "ckpt_marker"
    buf = tmp_path / "payload.ckpt"
    torch.save({"nemo_neva_weights": "model_weights", "x": Payload(marker)}, buf)
    bad = rewrite_nemo(tiny_nemo, str(tmp_path / "w.nemo"), replace={"model_weights.ckpt": buf.read_bytes()})
    # Even with torch's escape hatch set, the checkpoint is read with weights_only=True.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    restore = MegatronNevaModel.restore_from if route == "neva" else ModelPT.restore_from
    with pytest.raises(UnsafeCheckpointError, match="model_weights.ckpt"):
        restore(bad)
    assert not marker.exists()
