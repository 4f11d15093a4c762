"""Greedy answers for an evaluation set, one question at a time; images that cannot be used are skipped."""
from __future__ import annotations

from typing import Callable, Optional

from nemo_neva.evaluation_data import EvalSet
from nemo_neva.inference.prompting import build_prompt, stop_markers
from nemo_neva.security import open_user_image


def predict(model, eval_set: EvalSet, template: str, max_new_tokens: int,
            on_row: Optional[Callable[[dict], None]] = None) -> list:
    """-> rows {id, question, answers, question_type, image, prediction}; skips go to eval_set.skipped."""
    from nemo_neva.data.image_io import ImageError

    stop_ids, stop_strings = stop_markers(model.tokenizer, template)
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
            prediction = model.generate([image], [prompt], max_new_tokens=max_new_tokens, temperature=0.0,
                                        stop_token_ids=stop_ids, stop_strings=stop_strings)[0]
        except ValueError as err:  # e.g. a question too long for the context, an <image> tag without image
            eval_set.skip("unusable_question", item.id, str(err))
            continue
        row = {"id": item.id, "question": item.question, "answers": item.answers,
               "question_type": item.question_type, "image": item.image, "prediction": prediction.strip()}
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows
