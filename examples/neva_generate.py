"""Answer a question about an image with a .nemo NeVA model.

    python examples/neva_generate.py neva_model_file=M.nemo image_path=img.png prompt="What colour is it?"
    python examples/neva_generate.py neva_model_file=M.nemo prompts_file=in.jsonl output_file=out.jsonl
"""
import json

from nemo.core.config import hydra_runner
from omegaconf import OmegaConf

from nemo_neva import MegatronNevaModel
from nemo_neva.inference.generate import validate_sampling
from nemo_neva.inference.prompting import build_prompt, stop_markers
from nemo_neva.security import open_user_image
from nemo_neva.training import user_errors


def _requests(cfg):
    if cfg.prompts_file:
        with open(cfg.prompts_file) as f:
            return [json.loads(line) for line in f if line.strip()]
    if not cfg.prompt:
        raise ValueError("give prompt=... (with image_path=...) or prompts_file=...")
    return [{"image": cfg.image_path, "prompt": cfg.prompt}]


@hydra_runner(config_path="../conf", config_name="neva_inference")
@user_errors
def main(cfg) -> None:
    if not cfg.neva_model_file:
        raise ValueError("neva_model_file=... is required")
    inf = cfg.inference
    # Parameter ranges are checked before any work; the context-length check needs the model (in generate).
    validate_sampling(0.0 if inf.greedy else inf.temperature, inf.top_k, inf.top_p, inf.tokens_to_generate,
                      context=float("inf"))
    model = MegatronNevaModel.restore_from(cfg.neva_model_file)
    template = cfg.conv_template or model.cfg.data.conv_template
    stop_ids, stop_strings = stop_markers(model.tokenizer, template)
    steerlm = OmegaConf.to_container(inf.steerlm, resolve=True) if inf.get("steerlm") else None
    requests = _requests(cfg)
    answers = []
    for req in requests:
        # Byte and pixel limits before decoding; truncated/malformed files end with a clear message.
        image = open_user_image(req["image"]) if req.get("image") else None
        prompt = build_prompt(template, req["prompt"], image is not None, steerlm=steerlm)
        answers += model.generate(
            [image], [prompt], max_new_tokens=inf.tokens_to_generate,
            temperature=0.0 if inf.greedy else inf.temperature, top_k=inf.top_k, top_p=inf.top_p,
            seed=inf.seed, stop_token_ids=stop_ids, stop_strings=stop_strings,
        )
    if cfg.output_file:
        with open(cfg.output_file, "w") as f:
            for req, answer in zip(requests, answers):
                f.write(json.dumps({**req, "answer": answer}) + "\n")
    else:
        for answer in answers:
            print(answer)


if __name__ == "__main__":
    main()
