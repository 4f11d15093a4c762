"""Scoring a model on an evaluation JSONL: read the set (data), answer it greedily (run), score (scores, with
VQA normalisation in vqa and POPE-style yes/no in yes_no). `evaluate` is the one entry point: the
`neva_evaluate.py` script and the learning tests both score through it."""
from nemo_neva.evaluation.data import EvalItem, EvalSet, read_eval_file
from nemo_neva.evaluation.run import evaluate, predict
from nemo_neva.evaluation.scores import METRICS, check_metrics, score

__all__ = ["EvalItem", "EvalSet", "read_eval_file", "evaluate", "predict", "METRICS", "check_metrics", "score"]
