"""Fold the LoRA adapters of a PEFT .nemo into its base weights and write a full .nemo.

    neva-merge-lora --peft-nemo PEFT.nemo --output-path MERGED.nemo [--base-nemo BASE.nemo]

The base .nemo named inside the PEFT .nemo (checked against its SHA-256) is loaded first, then the adapters
and projector; W += (alpha / rank) * B A for every adapted layer. The result is a plain NeVA .nemo (no
`model.peft`), which scripts/export_to_hf.py can export.
"""
from nemo_neva.cli import quiet_logs

quiet_logs()  # before NeMo / megatron-core are imported

import argparse
import os
import sys



def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peft-nemo", required=True, help="the PEFT .nemo written by examples/neva_peft.py")
    ap.add_argument("--output-path", required=True, help="where to write the merged, full .nemo")
    ap.add_argument("--base-nemo", default=None, help="the base .nemo, if it moved since training "
                                                     "(its SHA-256 must still match)")
    args = ap.parse_args(argv)

    from nemo_neva.cli import user_errors

    return user_errors(_merge)(args)


def _merge(args) -> int:
    from omegaconf import open_dict

    from nemo_neva import MegatronNevaModel
    from nemo_neva.models import peft

    if not os.path.isfile(args.peft_nemo):
        raise FileNotFoundError(f"--peft-nemo {args.peft_nemo}: no such file")
    cfg = MegatronNevaModel.restore_from(args.peft_nemo, return_config=True)
    if peft.lora_settings(cfg) is None or not cfg.peft.get("base_nemo_path"):
        raise ValueError(f"{args.peft_nemo} is not a PEFT .nemo (no model.peft with a base .nemo)")
    if args.base_nemo:
        with open_dict(cfg):
            cfg.peft.base_nemo_path = os.path.abspath(args.base_nemo)
    model = MegatronNevaModel.restore_from(args.peft_nemo, override_config_path=cfg)
    n = peft.merge(model)
    model.save_to(args.output_path)
    print(f"merged {n} LoRA adapters; wrote {args.output_path}")
    return 0


if __name__ == "__main__":  # saving a .nemo starts a spawn-context helper: keep the guard
    sys.exit(main())
