"""Values shared by every data module (and by the model, which looks up the image token id)."""

# LLaVA's convention; NeMo used -1. Only the dataset sees it: the collator turns it into loss_mask=0.
IGNORE_INDEX = -100

# One image in the text; the dataset repeats its token id once per image feature position.
IMAGE_TOKEN = "<image>"

# One video in the text; `video_io.expand_video_tags` turns it into one IMAGE_TOKEN per sampled frame.
VIDEO_TOKEN = "<video>"
