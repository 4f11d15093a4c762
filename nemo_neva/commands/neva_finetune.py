"""Stage 2: start from a stage-1 .nemo, unfreeze the LM, train on instruction data, write a new .nemo.

    neva-finetune model.restore_from_path=PATH.nemo [hydra overrides]
"""
from nemo_neva.cli import quiet_logs

quiet_logs()  # before NeMo / megatron-core are imported

from nemo.core.config import hydra_runner

from nemo_neva import MegatronNevaModel
from nemo_neva.checkpoint.training_checkpoint import exp_manager_with_resume
from nemo_neva.cli import CONF_DIR, resolve_path, user_errors
from nemo_neva.models.finetune_config import finetune_config
from nemo_neva.models.model_config import resolve_model_config
from nemo_neva.parallel.init import setup_parallel
from nemo_neva.training.trainer import build_trainer, nemo_output_path


@hydra_runner(config_path=CONF_DIR, config_name="neva_finetune")
@user_errors
def main(cfg) -> None:
    restore = resolve_path(cfg.model.restore_from_path)
    if not restore or not __import__("os").path.isfile(restore):
        raise SystemExit(f"model.restore_from_path={cfg.model.restore_from_path!r}: no such .nemo file "
                         f"(run examples/neva_pretrain.py first, or pass the path)")
    model_cfg = finetune_config(restore, cfg.model)
    cfg.model = model_cfg
    setup_parallel(resolve_model_config(model_cfg, restoring=True).cfg)  # before the model is built
    trainer = build_trainer(cfg)
    exp_manager_with_resume(trainer, cfg.exp_manager)  # relaunching resumes from the last checkpoint
    model = MegatronNevaModel.restore_from(restore, override_config_path=model_cfg, trainer=trainer)
    trainer.fit(model)
    path = nemo_output_path(cfg)
    model.save_to(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
