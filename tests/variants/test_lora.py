"""LoRA finetuning: adapters on the LM's linear layers, PEFT .nemo (adapters + projector + base reference),
merge into a full .nemo, HF export from the merged one, and TP=2 == TP=1 with the same adapter weights."""
import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch
from omegaconf import open_dict

from nemo_neva import MegatronNevaModel, build_model
from nemo_neva.export.hf import UnsupportedCheckpoint, export_neva_to_hf
from nemo_neva.modules.lora import LoraLinear
from nemo_neva.parallel.init import free_port
from tests.export.hf_helpers import hf_logits, neva_logits, probe_inputs
from tests.model.helpers import ROOT
from tests.optional import require
from tests.variants.lora_cases import LORA, base_cfg, lora_logits, lora_train, peft_cfg, randomise_adapters

WORKER = os.path.join(ROOT, "tests", "variants", "lora_tp_worker.py")


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items() if torch.is_tensor(v)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """base.nemo (full), and peft.nemo: LoRA on it with non-zero adapters."""
    root = tmp_path_factory.mktemp("lora")
    base = build_model(base_cfg())
    base.save_to(str(root / "base.nemo"))
    model = MegatronNevaModel.restore_from(str(root / "base.nemo"), override_config_path=peft_cfg(str(root / "base.nemo")))
    step0 = lora_logits(model)
    randomise_adapters(model)
    model.save_to(str(root / "peft.nemo"))
    return root, lora_logits(base), step0, lora_logits(model)


def test_zero_b_keeps_base_logits_and_wraps_every_target(saved):
    _, base_logits, step0, adapted = saved
    assert torch.equal(step0, base_logits)  # B = 0: an untrained adapter changes nothing
    assert not torch.allclose(adapted, base_logits, atol=1e-4)  # ... and a trained one does (by up to 0.41)


def test_only_adapters_and_projector_learn(saved):
    root = saved[0]
    model = MegatronNevaModel.restore_from(str(root / "peft.nemo"))
    wrapped = [m for m in model.model.language_model.modules() if isinstance(m, LoraLinear)]
    assert len(wrapped) == 4 * model.cfg.num_layers
    lm, vis, proj = (_state(m) for m in (model.model.language_model, model.model.vision_tower,
                                         model.model.projector))
    lora_train(model, 2)
    after = _state(model.model.language_model)
    changed = {k for k in lm if not torch.equal(lm[k], after[k])}
    assert changed and all(k.endswith("lora_a") or k.endswith("lora_b") for k in changed), changed
    assert all(torch.equal(v, _state(model.model.vision_tower)[k]) for k, v in vis.items())
    assert any(not torch.equal(v, _state(model.model.projector)[k]) for k, v in proj.items())


def test_projector_frozen_when_asked(saved):
    root = saved[0]
    cfg = MegatronNevaModel.restore_from(str(root / "peft.nemo"), return_config=True)
    with open_dict(cfg):
        cfg.peft.train_projector = False
    model = MegatronNevaModel.restore_from(str(root / "peft.nemo"), override_config_path=cfg)
    proj = _state(model.model.projector)
    lora_train(model, 1)
    assert all(torch.equal(v, _state(model.model.projector)[k]) for k, v in proj.items())


def test_peft_nemo_holds_adapters_projector_and_base_reference(saved, tmp_path):
    from megatron.core.dist_checkpointing import load_tensors_metadata

    root, _, _, adapted = saved
    with tarfile.open(root / "peft.nemo") as tar:
        tar.extractall(tmp_path, filter="data")
    keys = set(load_tensors_metadata(str(tmp_path / "model_weights")))
    assert keys and all(k.endswith((".lora_a", ".lora_b")) or k.startswith("model.projector.") for k in keys)
    assert any(k.startswith("model.projector.") for k in keys)
    cfg = MegatronNevaModel.restore_from(str(root / "peft.nemo"), return_config=True)
    assert cfg.peft.base_nemo_path == str(root / "base.nemo") and len(cfg.peft.base_nemo_sha256) == 64
    restored = MegatronNevaModel.restore_from(str(root / "peft.nemo"))  # base first, then the adapters
    assert torch.equal(lora_logits(restored), adapted)


def test_restore_refuses_a_different_or_missing_base(saved, tmp_path):
    root = saved[0]
    cfg = MegatronNevaModel.restore_from(str(root / "peft.nemo"), return_config=True)
    with open_dict(cfg):
        cfg.peft.base_nemo_sha256 = "0" * 64
    with pytest.raises(ValueError, match="not the same base model"):
        MegatronNevaModel.restore_from(str(root / "peft.nemo"), override_config_path=cfg)
    with open_dict(cfg):
        cfg.peft.base_nemo_path = str(tmp_path / "gone.nemo")
    with pytest.raises(ValueError, match="base_nemo_path.*does not exist"):
        MegatronNevaModel.restore_from(str(root / "peft.nemo"), override_config_path=cfg)


def test_every_adapter_adds_alpha_over_rank_b_a_x_to_its_base(saved):
    """y = W x + (alpha / r) B A x, computed here from the raw tensors, alpha and r taken from the config."""
    model = MegatronNevaModel.restore_from(str(saved[0] / "peft.nemo")).eval()
    scale = LORA["lora"]["alpha"] / LORA["lora"]["rank"]
    layers = [m for m in model.model.language_model.modules() if isinstance(m, LoraLinear)]
    g = torch.Generator().manual_seed(3)
    for layer in layers:
        w, a, b = layer.base.weight, layer.lora_a, layer.lora_b
        assert layer.base.bias is None  # the LLaMA-style base config: no linear biases
        x = torch.randn(5, 2, w.shape[1], generator=g)  # [s, b, in], megatron's layout
        with torch.no_grad():
            out, bias = layer(x)
            want = x @ w.T + scale * ((x @ a.T) @ b.T)
        assert bias is None
        # fp32; measured 0.0 here (the same matmul kernels). The bound leaves room for a BLAS that groups the
        # 64-128-term dot products differently: fp32 rounding ~1e-7 relative per product, outputs below 1
        torch.testing.assert_close(out, want, rtol=0, atol=5e-6)
    assert len(layers) == 8


def _peft_lora(module, a, b):
    module.lora_A["default"].weight.copy_(a)
    module.lora_B["default"].weight.copy_(b)


def test_logits_and_merged_weights_equal_hugging_face_peft_on_the_exported_base(saved, tmp_path):
    """The base .nemo exported to HF, wrapped by Hugging Face PEFT (LoRA, same rank and alpha) and given our
    adapters (linear_qkv's B split into q / k / v rows per query group, linear_fc1's into gate / up; A shared):
    PEFT's logits equal the PEFT .nemo's, and PEFT's merge_and_unload weights equal our merged HF export's."""
    peft = require("peft")
    from transformers import LlavaForConditionalGeneration

    from scripts.merge_lora import main as merge_main

    root = saved[0]
    base = MegatronNevaModel.restore_from(str(root / "base.nemo"))
    hf = LlavaForConditionalGeneration.from_pretrained(export_neva_to_hf(base, str(tmp_path / "hf")),
                                                       dtype=torch.float32).eval()
    lora = LORA["lora"]
    hf = peft.get_peft_model(hf, peft.LoraConfig(
        r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=0.0,
        target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"))
    ours = MegatronNevaModel.restore_from(str(root / "peft.nemo")).eval()
    heads, groups, hidden = ours.cfg.num_attention_heads, ours.cfg.num_query_groups, ours.cfg.hidden_size
    per_group, dim, ffn = heads // groups, hidden // heads, ours.cfg.ffn_hidden_size
    hf_layers = hf.get_base_model().model.language_model.layers
    with torch.no_grad():
        for layer, theirs in zip(ours.model.language_model.decoder.layers, hf_layers, strict=True):
            qkv, fc1 = layer.self_attention.linear_qkv, layer.mlp.linear_fc1
            rows = qkv.lora_b.reshape(groups, (per_group + 2) * dim, -1)  # per group: [q heads, k, v]
            _peft_lora(theirs.self_attn.q_proj, qkv.lora_a, rows[:, :per_group * dim].flatten(0, 1))
            _peft_lora(theirs.self_attn.k_proj, qkv.lora_a, rows[:, per_group * dim:-dim].flatten(0, 1))
            _peft_lora(theirs.self_attn.v_proj, qkv.lora_a, rows[:, -dim:].flatten(0, 1))
            _peft_lora(theirs.self_attn.o_proj, layer.self_attention.linear_proj.lora_a,
                       layer.self_attention.linear_proj.lora_b)
            _peft_lora(theirs.mlp.gate_proj, fc1.lora_a, fc1.lora_b[:ffn])  # SwiGLU: [gate; up]
            _peft_lora(theirs.mlp.up_proj, fc1.lora_a, fc1.lora_b[ffn:])
            _peft_lora(theirs.mlp.down_proj, layer.mlp.linear_fc2.lora_a, layer.mlp.linear_fc2.lora_b)
    ids, pixels = probe_inputs(base.image_token_id, len(base.tokenizer))
    peft_logits = hf_logits(hf, ids, pixels)
    with hf.disable_adapter():
        assert not torch.allclose(hf_logits(hf, ids, pixels), peft_logits, atol=1e-3)  # PEFT's adapters are live
    # fp32 on both sides; measured 0.0 here. Fused qkv / fc1 matmuls here, separate projections there: another
    # BLAS may round them differently (~1e-7 relative per matmul, 2 layers, logits below 1): 2e-5 covers that
    torch.testing.assert_close(peft_logits, neva_logits(ours, ids, pixels), rtol=0, atol=2e-5)
    merged_path = str(tmp_path / "merged.nemo")
    assert merge_main(["--peft-nemo", str(root / "peft.nemo"), "--output-path", merged_path]) == 0
    exported = LlavaForConditionalGeneration.from_pretrained(
        export_neva_to_hf(MegatronNevaModel.restore_from(merged_path), str(tmp_path / "merged_hf")),
        dtype=torch.float32).state_dict()
    theirs = hf.merge_and_unload().state_dict()
    assert exported.keys() == theirs.keys()
    for key, value in exported.items():
        # W + (alpha / r) B A in fp32 by both (rank-4 products, weights below 1): measured 0.0; 1e-6 allows
        # another summation order of the 4 terms
        torch.testing.assert_close(value, theirs[key], rtol=0, atol=1e-6, msg=key)


GENERIC = r"""
import sys, torch
import nemo_neva
from nemo.core import ModelPT
from tests.variants.lora_cases import lora_logits
m = ModelPT.restore_from(sys.argv[1])
torch.save(lora_logits(m), sys.argv[2])
"""


def test_generic_modelpt_restore_of_peft_nemo(saved, tmp_path):
    """NeMo's own ModelPT.restore_from (fresh process) also loads the base, then the adapters."""
    root, _, _, adapted = saved
    proc = subprocess.run([sys.executable, "-c", GENERIC, str(root / "peft.nemo"), str(tmp_path / "out.pt")],
                          cwd=str(tmp_path), capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "out.pt"), adapted)


def test_bad_lora_config_and_peft_without_base_are_refused(tmp_path):
    for lora, match in (({"target_modules": ["linear_q"]}, "linear_q"), ({"rank": 0}, "rank=0"),
                        ({"dropout": 1.0}, "dropout")):
        cfg = base_cfg()
        with open_dict(cfg):
            cfg.peft = {"peft_scheme": "lora", "lora": lora}
        with pytest.raises(ValueError, match=match):
            build_model(cfg)
    cfg = base_cfg()
    with open_dict(cfg):
        cfg.peft = {"peft_scheme": "prefix_tuning"}
    with pytest.raises(ValueError, match="peft_scheme"):
        build_model(cfg)
    with open_dict(cfg):
        cfg.peft = {"peft_scheme": "lora"}
    with pytest.raises(ValueError, match="base .nemo"):
        build_model(cfg).save_to(str(tmp_path / "x.nemo"))


def test_merge_script_gives_identical_logits_and_exports_to_hf(saved, tmp_path, capsys):
    from transformers import LlavaForConditionalGeneration

    from scripts.merge_lora import main as merge_main

    root, _, _, adapted = saved
    peft_model = MegatronNevaModel.restore_from(str(root / "peft.nemo"))
    with pytest.raises(UnsupportedCheckpoint, match="merge_lora"):
        export_neva_to_hf(peft_model, str(tmp_path / "refused"))
    merged_path = str(tmp_path / "merged.nemo")
    assert merge_main(["--peft-nemo", str(root / "peft.nemo"), "--output-path", merged_path]) == 0
    assert "merged 8 LoRA adapters" in capsys.readouterr().out
    merged = MegatronNevaModel.restore_from(merged_path)
    assert merged.cfg.get("peft") is None
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    # W + s B A folded in fp32 rounds once per weight, unlike the separate W x + s B (A x): measured 2.4e-7 on
    # logits up to 0.8; 2e-5 is ~100x that and far below what a mis-scaled adapter moves (4e-1, test above)
    torch.testing.assert_close(lora_logits(merged), adapted, rtol=0, atol=2e-5)
    out = export_neva_to_hf(merged, str(tmp_path / "hf"))
    hf = LlavaForConditionalGeneration.from_pretrained(out).eval()
    ids, pixels = probe_inputs(merged.image_token_id, len(merged.tokenizer))
    # the merge's rounding (above) plus transformers' kernels (ATOL of tests/export/test_hf_interchange.py):
    # measured 2.1e-7
    torch.testing.assert_close(hf_logits(hf, ids, pixels), neva_logits(peft_model, ids, pixels), rtol=0, atol=1e-4)
    with pytest.raises(SystemExit) as exit_:
        merge_main(["--peft-nemo", merged_path, "--output-path", str(tmp_path / "again.nemo")])
    assert exit_.value.code == 2
    assert "not a PEFT .nemo" in capsys.readouterr().err


def _torchrun(out, nemo, *args):
    os.makedirs(out, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", WORKER, "--nemo", nemo, "--out", out, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(os.path.join(out, "losses.json")) as f:
        losses = json.load(f)
    logits = os.path.join(out, "logits.pt")
    return losses, torch.load(logits) if os.path.exists(logits) else None


def _adapters(path):
    model = MegatronNevaModel.restore_from(path)
    return {k: v for k, v in _state(model.model).items() if k.endswith(("lora_a", "lora_b"))}


@pytest.mark.parametrize("layout", [pytest.param(["--tp", "2"], id="tp2"),
                                    pytest.param(["--tp", "2", "--sp"], id="tp2_sp", marks=pytest.mark.slow),
                                    pytest.param(["--pp", "2"], id="pp2", marks=pytest.mark.slow)])
def test_two_ranks_lora_match_one(saved, tmp_path, layout):
    """Column-parallel bases: A replicated, B split on the output dim; row-parallel: A split on the input dim,
    B replicated. Same adapters at TP=2 -> same logits, same losses and same trained adapters as TP=1
    (PP=2: same losses and adapters)."""
    root, _, _, adapted = saved
    ref = MegatronNevaModel.restore_from(str(root / "peft.nemo"))
    ref_losses = lora_train(ref, 2)
    ref.save_to(str(tmp_path / "ref.nemo"))
    losses, logits = _torchrun(str(tmp_path / "tp2"), str(root / "peft.nemo"), *layout)
    # fp32; TP=2 splits each matmul and all-reduces the partial sums (another summation order). Measured at TP=2:
    # logits 1.8e-7 (of up to 0.8), losses 9.5e-7 (~6.5), trained adapters 4.9e-7 after 2 Adam steps; the bounds
    # are 20-50x that, while a wrongly split A or B moves logits by ~1e-1
    if "--pp" not in layout:
        torch.testing.assert_close(logits, adapted, rtol=0, atol=1e-5)
    assert losses == pytest.approx(ref_losses, abs=2e-5)
    ref_ad, tp_ad = _adapters(str(tmp_path / "ref.nemo")), _adapters(str(tmp_path / "tp2" / "trained.nemo"))
    assert ref_ad.keys() == tp_ad.keys() and len(ref_ad) == 16
    worst = max((ref_ad[k] - tp_ad[k]).abs().max().item() for k in ref_ad)
    assert worst < 2e-5, worst


def test_adapter_dropout_only_in_training(saved):
    root = saved[0]
    model = MegatronNevaModel.restore_from(str(root / "base.nemo"),
                                           override_config_path=peft_cfg(str(root / "base.nemo"), dropout=0.5))
    randomise_adapters(model)
    layer = model.model.language_model.decoder.layers[0].self_attention.linear_qkv
    x = torch.randn(5, 2, model.cfg.hidden_size)
    layer.train()
    assert not torch.equal(layer.delta(x), layer.delta(x))  # a fresh dropout mask per call
    layer.eval()
    assert torch.equal(layer.delta(x), layer.delta(x))
    assert all(torch.isfinite(torch.tensor(lora_train(model, 1))))
