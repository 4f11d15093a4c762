"""Convert LLaVA JSON/JSONL + an image folder (or uncompressed .tar) into a Megatron-Energon dataset.

    neva-convert-energon --data-path llava.json --image-folder IMAGES \
        --output-dir ENERGON --samples-per-shard 1000 [--sample-type auto|captioning|vqa|llava] \
        [--split-ratio 1,0,0] [--video-folder VIDEOS]

1. Writes webdataset shards, ENERGON/shard-000000.tar ... (per sample `<key>.json` = the LLaVA record,
   `<key>.<ext>` = its image bytes; `<key>.<i>.<ext>` for image i of several), checked as
   scripts/convert_llava_to_shards.py checks them (records, image paths, byte and pixel limits, decoding);
   every sample left out is listed in ENERGON/rejected.jsonl.
2. Writes ENERGON/.nv-meta/sample_loader.py, which turns a shard sample into Energon's CaptioningSample
   (image, caption: stage 1) or VQASample (image, context = the user turns, answers = the replies: stage 2,
   multi-turn as NeMo 2 reads it), or for records with videos nemo_neva's LlavaSample (the record and its
   image and video bytes; nemo_neva/data/energon_sample.py). `auto` picks llava when a record has a video,
   else captioning when every record is one exchange with one image, else vqa.
   A record with several images gets `image` = the list of their bytes in tag order (the `<image>` tags stay
   in the context turns): nemo_neva's task encoder reads that; other task encoders expect one image.
3. Runs Energon's own `energon prepare` on the folder, non-interactively (split, tar index, dataset.yaml),
   so the result is a real Energon dataset: `energon info ENERGON` / `energon preview ENERGON` read it, and
   NeMo 2 / Megatron-LM task encoders can train on it too.

Train on it with `model.data.data_path=ENERGON` (or a metadataset YAML that blends several).
Energon splits by shards: a val/test share needs enough shards to give it one.
"""
import argparse
import logging
import os
import sys

from nemo_neva.commands.conversion import add_source_args, data_source, written_report

SAMPLE_LOADER = '''# Written by nemo_neva's scripts/convert_llava_to_energon.py: a LLaVA record (<key>.json) and its image
# bytes (<key>.<ext>, or <key>.<i>.<ext> for image i of several: then `image` is their list, in tag order;
# videos likewise) -> {module}.{sample_type}. Works with decoded (dict) or raw (bytes) JSON parts.
import json

IMAGE_PARTS = ("png", "jpg", "jpeg", "webp", "gif", "bmp")
VIDEO_PARTS = ("mp4", "mkv", "avi")


def _record(raw):
    rec = raw["json"]
    if isinstance(rec, (bytes, bytearray)):
        rec = json.loads(bytes(rec).decode("utf-8"))
    return rec


def _is(part, kinds):  # "png" for a sample's only image, "<i>.png" for image i of several (videos alike)
    return part.rsplit(".", 1)[-1] in kinds


def _parts(raw, kinds):
    """The sample's part names of `kinds`, in the record's order."""
    return sorted((p for p in raw if _is(p, kinds) and raw[p] is not None),
                  key=lambda p: int(p.split(".")[0]) if "." in p else -1)


def _image(raw):
    """The only image, a list of several (in tag order), or None."""
    parts = _parts(raw, IMAGE_PARTS)
    if len(parts) == 1 and "." not in parts[0]:
        return raw[parts[0]]
    return [raw[p] for p in parts] or None


def sample_loader(raw: dict) -> dict:
    rec = _record(raw)
    turns = [t.get("value", "") if isinstance(t, dict) else "" for t in rec.get("conversations") or []]
    key = str(rec.get("id", raw["__key__"]))
{body}


def part_filter(part: str) -> bool:
    return part == "json" or _is(part, IMAGE_PARTS + VIDEO_PARTS)
'''

BODIES = {
    "CaptioningSample": '    return dict(__key__=key, image=_image(raw), caption=turns[1] if len(turns) > 1 else "")',
    "VQASample": "    return dict(__key__=key, image=_image(raw), context=turns[0::2], answers=turns[1::2])",
    "LlavaSample": "    return dict(__key__=key, record=dict(rec, id=key),\n"
                   "                images=[raw[p] for p in _parts(raw, IMAGE_PARTS)],\n"
                   "                videos=[raw[p] for p in _parts(raw, VIDEO_PARTS)])",
}
# Energon's own sample types, and ours for records with videos (nemo_neva/data/energon_sample.py)
MODULES = {"CaptioningSample": "megatron.energon", "VQASample": "megatron.energon",
           "LlavaSample": "nemo_neva.data.energon_sample"}


def pick_sample_type(data_path) -> str:
    """LlavaSample when a record has a video; else CaptioningSample when every record is a single exchange
    about an image, else VQASample."""
    from nemo_neva.data.records import iter_records

    kind = "CaptioningSample"
    for _, rec, error in iter_records(data_path):
        if error is not None or not isinstance(rec, dict):
            continue
        if rec.get("video") is not None:
            return "LlavaSample"
        image = rec.get("image")
        one = isinstance(image, str) or (isinstance(image, list) and len(image) == 1)
        if not one or len(rec.get("conversations") or []) != 2:
            kind = "VQASample"
    return kind


def _has_video(data_path) -> bool:
    from nemo_neva.data.records import iter_records

    return any(isinstance(rec, dict) and rec.get("video") is not None for _, rec, _ in iter_records(data_path))


def prepare(output_dir: str, sample_type: str, split_ratio: str, workers: int = 4) -> None:
    """Energon's `energon prepare`, non-interactive, in this process. It writes dataset.yaml for Energon's own
    sample types only; for ours it is written here, in the same form."""
    from megatron.energon.tools.prepare import command

    own = MODULES[sample_type] == "megatron.energon"
    command.main([output_dir, "--non-interactive", "--split-ratio", split_ratio, "--no-progress",
                  "--num-workers", str(workers)] + (["--sample-type", sample_type] if own else []),
                 standalone_mode=False)
    if not own:
        import yaml

        spec = {"sample_type": {"__module__": MODULES[sample_type], "__class__": sample_type},
                "sample_loader": "sample_loader.py:sample_loader", "part_filter": "sample_loader.py:part_filter"}
        with open(os.path.join(output_dir, ".nv-meta", "dataset.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(spec, f, sort_keys=False)


def convert(data_path, image_folder, output_dir, samples_per_shard=1000, sample_type="auto", split_ratio="1,0,0",
            full_decode=True, max_image_bytes=None, max_image_pixels=None, workers=4, video_folder=None) -> dict:
    from nemo_neva.data.image_io import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
    from nemo_neva.data.shard_writer import convert_to_shards

    types = {"captioning": "CaptioningSample", "vqa": "VQASample", "llava": "LlavaSample"}
    chosen = pick_sample_type(data_path) if sample_type == "auto" else types[sample_type]
    if chosen != "LlavaSample" and _has_video(data_path):
        raise ValueError(f"records in {data_path!r} have videos, which Energon's {chosen} cannot carry; use "
                         "--sample-type llava (or auto)")
    if os.path.isdir(os.path.join(output_dir, ".nv-meta")):
        raise FileExistsError(f"{output_dir} is already an Energon dataset; convert into an empty folder")
    index = convert_to_shards(data_path, image_folder, output_dir, samples_per_shard=samples_per_shard,
                              full_decode=full_decode, max_image_bytes=max_image_bytes or DEFAULT_MAX_BYTES,
                              max_image_pixels=max_image_pixels or DEFAULT_MAX_PIXELS, video_folder=video_folder)
    if index["total"] == 0:
        raise ValueError(f"no usable samples in {data_path!r}; see {os.path.join(output_dir, 'rejected.jsonl')}")
    meta = os.path.join(output_dir, ".nv-meta")
    os.makedirs(meta, exist_ok=True)
    with open(os.path.join(meta, "sample_loader.py"), "w", encoding="utf-8") as f:
        f.write(SAMPLE_LOADER.format(module=MODULES[chosen], sample_type=chosen, body=BODIES[chosen]))
    prepare(output_dir, chosen, split_ratio, workers)  # keeps our sample_loader.py, writes dataset.yaml
    index["sample_type"] = chosen
    return index


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(ap, "empty (or new) folder for the Energon dataset")
    ap.add_argument("--sample-type", choices=("auto", "captioning", "vqa", "llava"), default="auto",
                    help="captioning: CaptioningSample (stage 1); vqa: VQASample, multi-turn (stage 2); llava: "
                         "nemo_neva's LlavaSample, the record with its images and videos (needed for videos); "
                         "auto: llava if a record has a video, else captioning if every record is one exchange "
                         "with an image, else vqa")
    ap.add_argument("--split-ratio", default="1,0,0", help="train,val,test shares of the shards (default 1,0,0)")
    ap.add_argument("--workers", type=int, default=4, help="processes `energon prepare` indexes shards with")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    data = data_source(args)
    try:
        index = convert(data, args.image_folder, args.output_dir, args.samples_per_shard, args.sample_type,
                        args.split_ratio, full_decode=not args.header_only, max_image_bytes=args.max_image_bytes,
                        max_image_pixels=args.max_image_pixels, workers=args.workers,
                        video_folder=args.video_folder)
    except (FileExistsError, FileNotFoundError, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(written_report(f"an Energon dataset of {index['total']} {index['sample_type']}s", index, args.output_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
