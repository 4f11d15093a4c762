"""Greedy answers for an evaluation set, one question at a time, and the scored result. Questions that cannot
be used (unreadable image or video, too long for the context) are counted skips, reported beside the scores.

A question may hold several images and videos (evaluation/data.py): each video is sampled as the model was
trained (`model.data.video`), untagged videos and images go first (videos before images, as in training), and
the media reach `generate` in tag order."""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Optional

from nemo_neva.data.image_io import open_user_image
from nemo_neva.data.processor import ContextTooLong
from nemo_neva.data.skip_tally import skip_report
from nemo_neva.data.video_io import VideoError, media_in_tag_order, open_video, video_settings_of
from nemo_neva.evaluation.data import EvalSet
from nemo_neva.evaluation.scores import METRICS, check_metrics, score
from nemo_neva.inference.generation_config import GenerationConfig
from nemo_neva.inference.prompting import build_prompt, stop_markers

log = logging.getLogger(__name__)


def _listed(paths) -> list:
    return [] if paths is None else paths if isinstance(paths, list) else [paths]


def predict(model, eval_set: EvalSet, template: str, max_new_tokens: int,
            on_row: Optional[Callable[[dict], None]] = None) -> list:
    """-> rows {id, question, answers, question_type, image, [video,] prediction}; skips go to
    eval_set.skipped."""
    from nemo_neva.data.image_io import ImageError

    stop_ids, stop_strings = stop_markers(model.tokenizer, template)
    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=tuple(sorted(stop_ids)),
                              stop_strings=tuple(stop_strings))  # greedy
    processor = model.processor  # tags, encoding and the context check, as generation does them
    video_settings = video_settings_of(model.cfg)  # frames per video as the model was trained
    rows = []
    for item in eval_set.items:
        try:
            # Byte, frame and pixel limits are checked before decoding, as for generation.
            images = [open_user_image(p) for p in _listed(item.image)]
            videos = [open_video(p, video_settings) for p in _listed(item.video)]
        except VideoError as err:
            eval_set.skip(f"video_{err.reason}", item.id, err.detail)
            continue
        except ImageError as err:
            eval_set.skip(f"image_{err.reason}", item.id, err.detail)
            continue
        try:
            prompt = build_prompt(template, item.question, len(images), has_video=len(videos))
            media = media_in_tag_order(prompt, images, videos)
            try:
                inputs = processor(prompt, media or None, max_new_tokens, budget="max_new_tokens")
            except ContextTooLong as err:
                eval_set.skip("too_long", item.id, str(err))
                continue
            prediction = model.generate([None], [inputs], config)[0]
        except ValueError as err:  # e.g. an <image> tag in a question without an image, or too few tags
            eval_set.skip("unusable_question", item.id, str(err))
            continue
        row = {"id": item.id, "question": item.question, "answers": item.answers,
               "question_type": item.question_type, "image": item.image, "prediction": prediction.strip()}
        if item.video is not None:
            row["video"] = item.video
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
