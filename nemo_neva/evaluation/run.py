"""Greedy answers for an evaluation set, one question at a time, and the scored result. Questions that cannot
be used (unreadable image, too long for the context) are counted skips, reported beside the scores."""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Optional

from nemo_neva.data.image_io import open_user_image
from nemo_neva.data.skip_tally import skip_report
from nemo_neva.evaluation.data import EvalSet
from nemo_neva.evaluation.scores import METRICS, check_metrics, score
from nemo_neva.inference.generate import encode_prompt
from nemo_neva.inference.prompting import build_prompt, stop_markers

log = logging.getLogger(__name__)


def predict(model, eval_set: EvalSet, template: str, max_new_tokens: int,
            on_row: Optional[Callable[[dict], None]] = None) -> list:
    """-> rows {id, question, answers, question_type, image, prediction}; skips go to eval_set.skipped."""
    from nemo_neva.data.image_io import ImageError

    stop_ids, stop_strings = stop_markers(model.tokenizer, template)
    context = model.cfg.encoder_seq_length
    rows = []
    for item in eval_set.items:
        try:
            # Byte and pixel limits are checked before decoding, as for generation.
            image = open_user_image(item.image) if item.image else None
        except ImageError as err:
            eval_set.skip(f"image_{err.reason}", item.id, err.detail)
            continue
        try:
            prompt = build_prompt(template, item.question, image is not None)
            length = encode_prompt(model, prompt, image is not None).numel()
            if length + max_new_tokens > context:
                eval_set.skip("too_long", item.id, f"{length} prompt tokens + max_new_tokens={max_new_tokens} > "
                                                   f"context {context}")
                continue
            prediction = model.generate([image], [prompt], max_new_tokens=max_new_tokens, temperature=0.0,
                                        stop_token_ids=stop_ids, stop_strings=stop_strings)[0]
        except ValueError as err:  # e.g. an <image> tag in a question without an image
            eval_set.skip("unusable_question", item.id, str(err))
            continue
        row = {"id": item.id, "question": item.question, "answers": item.answers,
               "question_type": item.question_type, "image": item.image, "prediction": prediction.strip()}
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def evaluate(model, eval_set: EvalSet, template: str, max_new_tokens: int, metrics: Iterable[str] = METRICS,
             on_row: Optional[Callable[[dict], None]] = None) -> dict:
    """Answer and score `eval_set`: {"answered", "skipped" (by reason), "skip_report", "overall",
    "by_question_type"}. More than a few percent skipped is logged as a warning naming the fix."""
    metrics = check_metrics(metrics)
    rows = predict(model, eval_set, template, max_new_tokens, on_row=on_row)
    skipped = dict(eval_set.skipped)
    line, loud = skip_report(skipped, len(rows) + sum(skipped.values()), "questions")
    (log.warning if loud else log.info)("eval: %s", line)
    return {"template": template, "max_new_tokens": max_new_tokens, "metrics": metrics, "answered": len(rows),
            "skipped": skipped, "skip_report": line, "skip_warning": loud, **score(rows, metrics)}
