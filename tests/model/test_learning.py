"""Proof of learning: stage 1 alone lowers caption loss; the two-stage recipe beats chance on held-out images.

Chance levels: colour 1/5, shape 1/3, position 1/4 (count is mostly 1). Deterministic seeds; the bars leave a
margin for other machines' float rounding.
- CI variant (shipped data: 300 training images; 60 + 1200 steps, ~2 min on 2 idle cores): measured colour
  0.58-0.74, shape 0.60, position 0.30-0.50, count 1.00, overall 0.68-0.70 on the 60 shipped eval questions
  (two measurements on the dev box); now scored on 400 generated held-out questions instead (CI_EVAL: on 15
  shape questions one answer is 0.07, and an AMD box's shape 0.47 there was 0.70 on 400). Measured with CI_EVAL
  and the 300-pair media eval (AMD EPYC, 2 cores, one other light job; 4 min 7 s for the whole test): colour 0.73,
  shape 0.70, position 0.65, count 0.96, overall 0.76; more_shapes 0.80 (of 101), colour_in_image 1.00, motion 1.00.
- CI variant, two-image and motion tasks (`_media_stage`, MEDIA_CI): after the run above, one more
  `neva_finetune.py` run from its .nemo, 600 steps (batch 8, the finetune config's LR schedule) on freshly generated
  data (`make_shapes_dataset` seed 11: 450 two-image samples + 150 motion videos of 2 frames,
  `model.data.video.num_frames=2`, one list data_path), scored on 300 held-out pairs (earlier 120, of which 25-48 "Which image has
  more shapes?", the rest "What colour is the shape in the first/second image?") and 60 held-out videos ("Which way
  does the shape move?"). Chance: more_shapes 0.5, colour_in_image 0.2, motion 0.5. Bars: more_shapes >= 0.6 (0.65 on the smaller pair set),
  colour_in_image >= 0.6, motion >= 0.75 (at chance, 0.65 of 40 two-way questions happens ~4 % of the time,
  of 25 ~8 %; 0.75 of 60 ~0.02 %). Measured with this recipe (driver runs of `_media_stage` from the same CI .nemo, data
  seeds 11-14): colour_in_image 1.00 (all four), more_shapes 0.71-0.87, motion 0.92-1.00; the third run adds 116 s
  (data 1 s, process start 11 s, 600 steps 95 s, 180 answers 9 s) in the full CI test on a 2-core box shared with
  other jobs, where the two runs before it took 175 s (~2 min idle), so roughly +80 s on idle cores. That full run
  (pytest -k beats_chance_ci, 4:55 wall): colour_in_image 1.00, more_shapes 0.74 (29 of 39), motion 1.00; the
  single-image scores before it: colour 0.74, shape 0.47, position 0.60, count 0.88, overall 0.68 (the same in two
  runs, and exactly the same at this branch's base commit 641ad5f without any of this work: shape is below its
  0.5 bar on that base already; the media stage runs after those scores are taken).
  Recipes tried on the way (seed 11 unless said, pair eval 60 questions): 4 frames do not fit: 64 frame tokens + the
  nvgpt prompt = 121 tokens, + 8 new > the 128 context (every video question skipped as too_long). 3 frames, 300
  pairs + 300 videos: 400 steps: colour_in_image 0.63, more_shapes 0.40, motion 0.57 (always "right", training
  videos too); 600 steps: 0.83 / 0.70 / 0.43; 1000 steps: 1.00 / 0.90 / 1.00 (~+2 min). 2 frames, 300 + 300: 1000
  steps 1.00 / 0.75 / 1.00; 600 steps 0.93 / 0.75 / 1.00, seed 12: 0.92 / 0.68 / 1.00, seed 13: 0.72 / 0.47 / 1.00
  (more_shapes a coin flip). More pairs, fewer videos (450 + 150, the recipe kept): seed 13: 1.00 / 0.78 / 1.00,
  seed 11: 1.00 / 0.74 / 1.00; with 120 pair questions seed 12: 1.00 / 0.87 / 1.00, seed 14: 1.00 / 0.71 / 0.92.
  Motion with 2 frames is learnt abruptly (chance -> 1.00) somewhere before 600 steps; "more shapes" is the slow one
  (counting in both images).
  The slow variant below ends with the same third run, longer (MEDIA_SLOW: 2000 steps on 3000 pairs + 1000
  two-frame videos, scored on 600 pairs, 200 of them more_shapes, and 300 videos). Bars: more_shapes >= 0.90,
  colour_in_image >= 0.95, motion >= 0.95. Measured once (`make learn`, shared 2-core box): colour_in_image
  1.00, more_shapes 0.995, motion 1.00; the third run took 234 s of the test's 1133 s (19 min wall; the two
  stages before it 899 s here against 9.6 min on idle cores: timings inflated by the other jobs; their scores in
  that run: colour 1.00, shape 1.00, position 0.97, count 1.00, overall 0.99).
- slow variant (`make learn`): freshly generated data (seed 7): 40000 training images, so the finetune samples
  rarely repeat an image, 80 % of them with 2-3 shapes (train_size_weights (1, 2, 2)); 1000 held-out questions
  (about 240 colour) whose scenes keep the default mix (60 % one shape). Vision features from the tower's
  embedding output (vision_select_layer=0: a random 2-layer tower's attention blurs where a colour is); LM
  initialised at std 0.08; 300 pretraining steps (batch 8), then 5000 finetuning steps of global batch 32 on
  2 data-parallel ranks (torchrun, gloo, micro batch 16 each).
  Bars: colour >= 0.90 (chance 0.20), shape >= 0.90, overall >= 0.85.
  Measured (`make learn`): colour 1.00, shape 1.00, position 0.94, count 1.00, overall 0.98; 9.6 min wall on
  2 idle cores (985 s CPU: pytest, its training processes and the 2 ranks' gloo waits); the finetune takes
  ~0.1 s per step. Other data seed / model.seed pairs, same recipe (driver runs, same scoring): 8 / 99:
  colour 1.00, shape 1.00, position 0.99, overall 1.00; 9 / 42: colour 0.99 (1.00 with 1-2 shapes, 0.83
  with 3), shape 1.00, position 0.92, overall 0.98.
  Why these settings. A question about one of 2-3 shapes needs colour (or shape) bound to the named position;
  runs either learn that (1.00 on 2-shape scenes) or stay near a coin flip between the scene's colours or
  shapes (0.5-0.7 on 2-shape scenes, single-shape scenes always 1.00) - a plateau that the seeds decided with
  smaller batches. Colour on the 1000 questions, by recipe (data / model seeds):
  - init 0.02, batch 8, 6000 steps (the previous recipe): 0.99 at 7 / 1234, 0.83 at 8 / 99. At 8 / 99 none
    of these helped: finetune LR 6e-3 (0.82), a 3rd layer (0.83), 8 heads (0.83), hidden 128 with 8 heads
    (0.85), 12000 steps (0.87), more 3-shape scenes (1, 3, 6) (0.84; 0.83 at 7 / 1234); LR 1.5e-3 fixed
    8 / 99 (0.99) but broke 7 / 1234 (0.82).
  - init 0.08, batch 8: 0.83 at 8 / 99 (shape 1.00). Batch 16 (init 0.02): 1.00 at 8 / 99 and 9 / 42, 0.83
    at 7 / 1234.
  - init 0.08, batch 16, 6000 steps: colour 0.95-0.99 at 7 / 1234, 8 / 99, 9 / 42 (one process or 2 ranks),
    but on 2 ranks at 8 / 99 shape stayed at 0.84 (0.63 with 2 shapes). Batch 32 on 2 ranks learnt both.
  Earlier levers that still matter: many distinct images AND mostly multi-shape scenes (with 4000 images, or
  with the default one-shape-heavy mix, colour stayed at 0.79-0.85).
"""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from nemo_neva import MegatronNevaModel, build_model
from nemo_neva.evaluation import evaluate, read_eval_file
from nemo_neva.evaluation.scores import exact_match_vqa
from nemo_neva.parallel.init import free_port
from tests.model.helpers import ROOT, tiny_model_cfg

DEMO = os.path.join(ROOT, "data", "shapes_demo")
DEMO_PATHS = {"stage1": os.path.join(DEMO, "stage1_captions.json"), "stage2": os.path.join(DEMO, "stage2_instruct.json"),
              "eval": os.path.join(DEMO, "eval.jsonl"), "image_folder": os.path.join(DEMO, "images")}

# Slow variant (see the module docstring for what it measured). A fresh image for (almost) every finetune
# sample, and training scenes mostly of 2-3 shapes (eval keeps the default mix): with either alone the model
# did not learn which colour sits where.
LEARN_TRAIN, LEARN_EVAL, LEARN_SEED, LEARN_SIZE_WEIGHTS = 40000, 1000, 7, (1, 2, 2)
LEARN_PRETRAIN, LEARN_FINETUNE = 300, 5000
# LM initialised at std 0.08 (the config's 0.02 suits wide LMs; at hidden 64 it keeps attention near uniform
# for longer) and finetuned with global batch 32 on 2 data-parallel ranks: with smaller batches or the
# config's init, whether colour and shape got bound to position depended on the seeds (see the docstring).
LEARN_PRETRAIN_ARGS = ["model.mm_cfg.vision_encoder.vision_select_layer=0", "model.micro_batch_size=8",
                       "model.init_method_std=0.08"]
LEARN_FINETUNE_ARGS = ["model.micro_batch_size=16", "model.global_batch_size=32"]
LEARN_FINETUNE_RANKS = 2

# CI variant, two-image and motion tasks: a third short run (see _media_stage and the docstring).
MEDIA_SEED = 11
# Unpooled frames. With model.mm_cfg.video.pool=2x2 switched on for this run (each frame's 4x4 grid of layer-0
# features averaged to 2x2), one run measured motion 0.47, colour_in_image 0.66, more_shapes 0.60 (2026-12-03, on
# a base that scored colour 0.63 / shape 0.77 / overall 0.74): 600 steps did not teach pooled 2-frame motion to
# this tiny model, so pooling is proven by its oracle tests (tests/model/test_video_pool.py), not here.
MEDIA_CI = dict(steps=600, n_pairs=450, n_videos=150, n_pair_eval=300, n_video_eval=60, frames=2)
MEDIA_CI_BARS = {"more_shapes": 0.6, "colour_in_image": 0.6, "motion": 0.75}
# CI single-image scoring set: 60 shipped questions hold ~15 shape questions, where one answer moves the score by
# 0.07. On an AMD EPYC box the CI model scored shape 0.47 (7 of 15, below the 0.5 bar) on them but 0.70 / 0.71
# on 400 fresh questions of seeds 101 / 202 (colour 0.74 / 0.66, overall 0.76 / 0.73): the bar failed on the
# sample, not the model. 400 questions give ~100 per category (standard error ~0.05 at 0.7).
CI_EVAL = dict(n=400, seed=101)
# Slow variant: the same third run, longer and on more data (see the docstring).
MEDIA_SLOW = dict(steps=2000, n_pairs=3000, n_videos=1000, n_pair_eval=600, n_video_eval=300, frames=2)
MEDIA_SLOW_BARS = {"more_shapes": 0.9, "colour_in_image": 0.95, "motion": 0.95}


def test_the_users_exact_match_accepts_the_shapes_answers_as_written():
    """The learning tests score with the evaluator users run (neva_evaluate.py): its normalisation must accept
    the replies the shapes task trains (articles, punctuation, number words)."""
    assert exact_match_vqa("The red circle!", ["red circle"]) == 1.0 and exact_match_vqa("Two.", ["2"]) == 1.0
    assert exact_match_vqa("on the left.", ["left", "on the left"]) == 1.0 and not exact_match_vqa("right", ["left"])


def _caption_batches(model, indices, batch_size):
    from nemo_neva.data.collate import NevaCollator

    ds = model.build_dataset(model.cfg.data)
    collate = NevaCollator(pad_id=model.tokenizer.pad_token_id)
    return [collate([ds[i] for i in indices[k:k + batch_size]]) for k in range(0, len(indices), batch_size)]


def test_stage1_alone_lowers_caption_loss_with_the_lm_frozen():
    """Only the projector learns (LM bit-identical afterwards), yet the loss on 60 held-out captions drops:
    the image tokens it produces make the frozen (here random) LM predict the captions better.
    Measured: 6.44 -> 6.26 after 60 steps (~10 s)."""
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg(**{"mm_cfg.llm.freeze": True, "optim.lr": 1e-2,
                                                "optim.sched.min_lr": 1e-3}))
    lm_before = {k: v.clone() for k, v in model.model.language_model.state_dict().items() if torch.is_tensor(v)}
    held_out = _caption_batches(model, list(range(240, 300)), 20)

    def held_out_loss():
        model.eval()
        with torch.no_grad():
            return sum(float(model.loss_from_batch(b)[0]) for b in held_out) / len(held_out)

    before = held_out_loss()
    opt = model.configure_optimizers()
    model.train()
    train = _caption_batches(model, list(range(240)), model.cfg.global_batch_size)
    for step in range(60):
        model.train_on_batch(train[step % len(train)], opt)
    after = held_out_loss()
    lm_after = model.model.language_model.state_dict()
    assert all(torch.equal(v, lm_after[k]) for k, v in lm_before.items())
    assert after < before - 0.08, (before, after)


def _run(exp_dir, script, *args, ranks=1):
    """An example script as a user runs it (its .nemo lands in exp_dir/<name>/<name>.nemo)."""
    launch = [sys.executable]
    if ranks > 1:  # data parallel over gloo, as a user with several CPU cores / GPUs would launch it
        launch += ["-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
                   f"--master_port={free_port()}"]
        args += (f"trainer.devices={ranks}",)
    proc = subprocess.run([*launch, os.path.join(ROOT, "examples", script), *args, f"exp_manager.exp_dir={exp_dir}"],
                          cwd=str(exp_dir), capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _scores(result) -> dict:
    assert result["skipped"] == {}, result["skip_report"]  # every held-out question is scored
    scores = {t: g["exact_match"] for t, g in result["by_question_type"].items()}
    scores["overall"] = result["overall"]["exact_match"]
    return scores


def _two_stage(tmp_path, paths, pretrain_steps, finetune_steps, pretrain_args=(), finetune_args=(),
               finetune_ranks=1, eval_paths=None):
    """Stage 1 then stage 2 through the example scripts, scored on `eval_paths` ({"eval", "image_folder"};
    default: `paths`' own eval file)."""
    def run(script, *args, ranks=1):
        _run(tmp_path, script, *args, ranks=ranks)

    data = [f"model.data.image_folder={paths['image_folder']}"]
    run("neva_pretrain.py", f"trainer.max_steps={pretrain_steps}", f"model.data.data_path={paths['stage1']}",
        *data, *pretrain_args)
    run("neva_finetune.py", f"model.restore_from_path={tmp_path}/neva_pretrain/neva_pretrain.nemo",
        f"trainer.max_steps={finetune_steps}", f"model.data.data_path={paths['stage2']}", *data, *finetune_args,
        ranks=finetune_ranks)
    model = MegatronNevaModel.restore_from(str(tmp_path / "neva_finetune" / "neva_finetune.nemo"))
    held_out = eval_paths or paths
    scores = _scores(evaluate(model, read_eval_file(held_out["eval"], held_out["image_folder"]), "nvgpt",
                              max_new_tokens=8, metrics=["exact_match"]))
    (tmp_path / "scores.json").write_text(json.dumps(scores))
    print(scores)
    return scores


def _media_stage(tmp_path, finetuned_nemo, steps, n_pairs, n_videos, n_pair_eval, n_video_eval, frames,
                 seed=MEDIA_SEED, args=()):
    """A further finetune of `finetuned_nemo` on freshly generated two-image and motion-video samples (mixed in one
    stage-2 run, a list data_path), then held-out two-image and video questions -> scores by question type."""
    from nemo_neva.data.shapes import make_shapes_dataset

    paths = make_shapes_dataset(str(tmp_path / "media_data"), 0, 0, seed=seed, n_two_image=n_pairs,
                                n_video_train=n_videos, n_video_eval=n_video_eval, video_frames=frames)
    exp_dir = tmp_path / "media"
    exp_dir.mkdir()
    _run(exp_dir, "neva_finetune.py", f"model.restore_from_path={finetuned_nemo}", f"trainer.max_steps={steps}",
         f"model.data.data_path=[{paths['stage2']},{paths['video_stage2']}]",
         f"model.data.image_folder={paths['image_folder']}", f"model.data.video_folder={paths['video_folder']}",
         f"model.data.video.num_frames={frames}", *args)
    model = MegatronNevaModel.restore_from(str(exp_dir / "neva_finetune" / "neva_finetune.nemo"))
    assert model.cfg.data.video.num_frames == frames  # recorded in the .nemo: evaluation samples as trained
    pairs = read_eval_file(paths["eval_two_image"], paths["image_folder"])
    pairs.items = pairs.items[:n_pair_eval]  # n_two_image held-out pairs are written: score the first ones
    videos = read_eval_file(paths["video_eval"], video_folder=paths["video_folder"])
    scores = {}
    for eval_set in (pairs, videos):
        scores.update(_scores(evaluate(model, eval_set, "nvgpt", max_new_tokens=8, metrics=["exact_match"])))
    scores.pop("overall")
    (tmp_path / "media_scores.json").write_text(json.dumps(scores))
    print(scores)
    return scores


def test_two_stage_recipe_beats_chance_ci(tmp_path):
    from nemo_neva.data.shapes import make_shapes_dataset

    # Scored on 400 freshly generated held-out questions, not the 60 shipped ones (see CI_EVAL)
    held_out = make_shapes_dataset(str(tmp_path / "ci_eval"), 0, CI_EVAL["n"], seed=CI_EVAL["seed"])
    scores = _two_stage(tmp_path, DEMO_PATHS, 60, 1200, eval_paths=held_out)
    # then the two-image and motion tasks, from the finetuned .nemo (its single-image scores are taken above)
    scores.update(_media_stage(tmp_path, tmp_path / "neva_finetune" / "neva_finetune.nemo", **MEDIA_CI))
    # chance: colour 0.2, shape 1/3; more_shapes (first / second) 0.5, colour_in_image 0.2, motion (left / right) 0.5
    bars = {"colour": 0.45, "shape": 0.5, "overall": 0.5, **MEDIA_CI_BARS}
    assert all(scores[k] >= bar for k, bar in bars.items()), (scores, bars)


@pytest.mark.slow
def test_two_stage_recipe_reaches_the_colour_bar(tmp_path):
    """Held-out colour questions >= 90 % (chance 20 %; measured 1.00 here, 0.99-1.00 at 2 other seed pairs), then
    held-out two-image and motion-video questions >= 90-95 % (measured 0.995-1.00)."""
    from nemo_neva.data.shapes import make_shapes_dataset

    start, cpu_start = time.time(), os.times()
    paths = make_shapes_dataset(str(tmp_path / "data"), LEARN_TRAIN, LEARN_EVAL, seed=LEARN_SEED,
                                train_size_weights=LEARN_SIZE_WEIGHTS)
    scores = _two_stage(tmp_path, paths, LEARN_PRETRAIN, LEARN_FINETUNE, LEARN_PRETRAIN_ARGS, LEARN_FINETUNE_ARGS,
                        LEARN_FINETUNE_RANKS)
    cpu = [b - a for a, b in zip(cpu_start, os.times())][:4]  # user + system, this process and its children
    print(f"wall time {time.time() - start:.0f} s, CPU time {sum(cpu):.0f} s")
    scores.update(_media_stage(tmp_path, tmp_path / "neva_finetune" / "neva_finetune.nemo", **MEDIA_SLOW))
    print(f"with the media stage: wall time {time.time() - start:.0f} s", scores)
    bars = {"colour": 0.90, "shape": 0.90, "overall": 0.85, **MEDIA_SLOW_BARS}
    assert all(scores[k] >= bar for k, bar in bars.items()), (scores, bars)
