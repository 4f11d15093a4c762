"""Run under either stack (Python 3.11 + megatron-core 0.16.1, or Python 3.12 + 0.19.x) by
test_cross_stack_nemo.py. `write DIR`: a tiny perturbed model saved as DIR/model.nemo, with its batch, logits
and state dict in DIR/ref.pt. `read NEMO REF OUT`: restore NEMO, run REF's batch, save logits + state dict."""
import sys
from importlib.metadata import version

import torch

from nemo_neva import MegatronNevaModel, build_model
from tests.model.helpers import batch_for, llama_overrides, tiny_model_cfg


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(batch["tokens"], batch["position_ids"], images=batch["images"])


def write(folder):
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg(**llama_overrides()))
    with torch.no_grad():  # away from the init, so a restore that silently re-initialises shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_to(f"{folder}/model.nemo")
    batch = batch_for(model)
    torch.save({"batch": batch, "logits": _logits(model, batch), "state": _state(model),
                "mcore": version("megatron-core")}, f"{folder}/ref.pt")


def read(nemo, ref, out):
    model = MegatronNevaModel.restore_from(nemo)
    batch = torch.load(ref)["batch"]
    torch.save({"logits": _logits(model, batch), "state": _state(model), "mcore": version("megatron-core")}, out)


if __name__ == "__main__":
    {"write": write, "read": read}[sys.argv[1]](*sys.argv[2:])
