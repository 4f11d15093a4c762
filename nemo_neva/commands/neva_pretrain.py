"""Stage 1: train the projector on image-caption pairs (LM and vision frozen), write a .nemo.

    neva-pretrain [hydra overrides, e.g. trainer.max_steps=3 exp_manager.exp_dir=/tmp/x]
"""
from nemo_neva.cli import quiet_logs

quiet_logs()  # before NeMo / megatron-core are imported

from nemo.core.config import hydra_runner

from nemo_neva import MegatronNevaModel
from nemo_neva.checkpoint.training_checkpoint import exp_manager_with_resume
from nemo_neva.cli import CONF_DIR, user_errors
from nemo_neva.models.model_config import resolve_model_config
from nemo_neva.parallel.init import setup_parallel
from nemo_neva.pretrained.lm_config import drop_unset_lm_keys, hydra_cli_overrides
from nemo_neva.training.trainer import build_trainer, nemo_output_path


@hydra_runner(config_path=CONF_DIR, config_name="neva_pretrain")
@user_errors
def main(cfg) -> None:
    # llm.from_pretrained: the LM keys (and tokenizer.path) the command line did not set come from the checkpoint
    drop_unset_lm_keys(cfg.model, hydra_cli_overrides())
    cfg.model = resolve_model_config(cfg.model).cfg  # the config the network is built from
    setup_parallel(cfg.model)  # torch.distributed + megatron-core's groups, before the model is built
    trainer = build_trainer(cfg)
    exp_manager_with_resume(trainer, cfg.exp_manager)  # relaunching resumes from the last checkpoint
    model = MegatronNevaModel(cfg.model, trainer=trainer)
    trainer.fit(model)
    path = nemo_output_path(cfg)
    model.save_to(path)
    print(f"wrote {path}")


if __name__ == "__main__":  # the guard matters: checkpoint saving starts worker processes
    main()
