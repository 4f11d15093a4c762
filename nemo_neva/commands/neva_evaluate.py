"""Score a .nemo NeVA model on an evaluation JSONL with greedy decoding.

    neva-evaluate neva_model_file=M.nemo eval_file=eval.jsonl output_dir=OUT \
        [metrics=[vqa,exact_match,yes_no]] [max_new_tokens=16] [image_folder=DIR] [video_folder=DIR] [limit=N]

Writes OUT/predictions.jsonl (one line per answered question) and OUT/metrics.json (VQA accuracy, exact
match, POPE-style yes/no precision/recall/F1/yes-ratio, per question type, and the skipped lines by reason).
"""
from nemo_neva.cli import quiet_logs

quiet_logs()  # before NeMo / megatron-core are imported

import json
import os
import sys

from nemo.core.config import hydra_runner
from omegaconf import OmegaConf

from nemo_neva import MegatronNevaModel
from nemo_neva.cli import CONF_DIR, resolve_path, user_errors
from nemo_neva.evaluation import check_metrics, evaluate, read_eval_file
from nemo_neva.inference.generation_config import GenerationConfig


@hydra_runner(config_path=CONF_DIR, config_name="neva_evaluate")
@user_errors
def main(cfg) -> None:
    for key in ("neva_model_file", "eval_file", "output_dir"):
        if not cfg.get(key):
            raise ValueError(f"{key}=... is required")
    metrics = check_metrics(OmegaConf.to_container(cfg.metrics, resolve=True))
    GenerationConfig(max_new_tokens=cfg.max_new_tokens)  # checked before the model loads
    model_file = resolve_path(cfg.neva_model_file)
    if not os.path.isfile(model_file):
        raise FileNotFoundError(f"neva_model_file={cfg.neva_model_file!r}: no such file")
    image_folder = resolve_path(cfg.image_folder) if cfg.image_folder else None
    video_folder = resolve_path(cfg.video_folder) if cfg.get("video_folder") else None
    eval_set = read_eval_file(resolve_path(cfg.eval_file), image_folder, video_folder)
    if cfg.limit is not None:
        eval_set.items = eval_set.items[: int(cfg.limit)]
    out_dir = os.path.abspath(cfg.output_dir)
    os.makedirs(out_dir, exist_ok=True)

    model = MegatronNevaModel.restore_from(model_file)
    template = cfg.conv_template or model.cfg.data.conv_template
    with open(os.path.join(out_dir, "predictions.jsonl"), "w", encoding="utf-8") as f:
        def write(row):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()

        result = evaluate(model, eval_set, template, cfg.max_new_tokens, metrics, on_row=write)

    result = {"neva_model_file": model_file, "eval_file": resolve_path(cfg.eval_file), **result}
    with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    overall = result["overall"]
    print(json.dumps({k: overall[k] for k in overall if k != "yes_no"}))
    if "yes_no" in overall:
        print("yes/no:", json.dumps(overall["yes_no"]))
    print(f"answered {result['answered']} questions; {result['skip_report']}")
    if result["skip_warning"]:
        print(f"WARNING: {result['skip_report']}; the scores cover only the answered questions", file=sys.stderr)
    print(f"wrote {out_dir}/predictions.jsonl and {out_dir}/metrics.json")


if __name__ == "__main__":
    main()
