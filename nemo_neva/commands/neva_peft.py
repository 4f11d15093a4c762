"""PEFT (LoRA): start from a stage-1/2 .nemo, train LoRA adapters on the frozen LM (+ the projector), and write
a PEFT .nemo that holds only the adapters + projector and a checksummed reference to the starting .nemo.

    neva-peft model.restore_from_path=PATH.nemo [model.peft.lora.rank=16 ...]
    neva-merge-lora --peft-nemo OUT.nemo --output-path MERGED.nemo   # a full .nemo again
"""
from nemo_neva.cli import quiet_logs

quiet_logs()  # before NeMo / megatron-core are imported

import os

from nemo.core.config import hydra_runner

from nemo_neva import MegatronNevaModel
from nemo_neva.checkpoint.training_checkpoint import exp_manager_with_resume
from nemo_neva.cli import CONF_DIR, resolve_path, user_errors
from nemo_neva.models.finetune_config import finetune_config
from nemo_neva.models.model_config import resolve_model_config
from nemo_neva.models.peft import lora_settings
from nemo_neva.parallel.init import setup_parallel
from nemo_neva.training.trainer import build_trainer, nemo_output_path


@hydra_runner(config_path=CONF_DIR, config_name="neva_peft")
@user_errors
def main(cfg) -> None:
    restore = resolve_path(cfg.model.restore_from_path)
    if not restore or not os.path.isfile(restore):
        raise FileNotFoundError(f"model.restore_from_path={cfg.model.restore_from_path!r}: no such .nemo file "
                                "(train one with examples/neva_pretrain.py or neva_finetune.py first)")
    own = MegatronNevaModel.restore_from(restore, return_config=True)
    if (own.get("peft") or {}).get("base_nemo_path"):
        raise ValueError(f"{restore} is already a PEFT .nemo (adapters on {own.peft.base_nemo_path}); "
                         "merge it first with scripts/merge_lora.py and start from the merged .nemo")
    model_cfg = finetune_config(restore, cfg.model)
    if lora_settings(model_cfg) is None:
        raise ValueError("model.peft.peft_scheme is null: nothing to train here (use examples/neva_finetune.py)")
    cfg.model = model_cfg
    setup_parallel(resolve_model_config(model_cfg, restoring=True).cfg)  # before the model is built
    trainer = build_trainer(cfg)
    exp_manager_with_resume(trainer, cfg.exp_manager)  # relaunching resumes from the last checkpoint
    # The constructor loads the base weights, adds the adapters (B = 0) and records `restore` as their base.
    model = MegatronNevaModel.restore_from(restore, override_config_path=model_cfg, trainer=trainer)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"trainable parameters: {trainable} of {total} ({100.0 * trainable / total:.2f}%)")
    trainer.fit(model)
    path = nemo_output_path(cfg)
    model.save_to(path)
    print(f"wrote {path} (adapters + projector; base: {model.cfg.peft.base_nemo_path})")


if __name__ == "__main__":
    main()
