"""`LlavaSample`: the Energon sample type scripts/convert_llava_to_energon.py writes for records with videos
(`--sample-type llava`; `auto` picks it when any record has one). Energon's own types cannot hold them:
CaptioningSample / VQASample carry images only, VidQASample one video and no image. This one carries the
LLaVA record itself (turns with their `<image>` / `<video>` tags, "image" / "video" names, system, attributes)
and the media bytes in the record's order, so nemo_neva's task encoder reads it exactly as the JSON path reads
the record. Its dataset.yaml names this module, so reading such a dataset needs nemo_neva installed."""
from __future__ import annotations

from typing import List

from megatron.energon import Sample
from megatron.energon.edataclass import edataclass


@edataclass
class LlavaSample(Sample):
    #: the LLaVA record (`id` = the sample key)
    record: dict
    #: the bytes of the record's "image" files, in its order
    images: List[bytes]
    #: the bytes of the record's "video" files, in its order
    videos: List[bytes]
