"""Convert LLaVA JSON/JSONL + an image folder (or uncompressed .tar) into tar shards for streaming.

    neva-convert-shards --data-path llava.json --image-folder IMAGES \
        --output-dir SHARDS --samples-per-shard 1000

Writes SHARDS/shard-000000.tar ... (per sample `<key>.json` = the record, `<key>.<ext>` = its image
bytes, `<key>.<i>.<ext>` for image i of several; its videos likewise, `--video-folder` default the image
folder), SHARDS/index.json (samples per shard, totals, skip counts) and SHARDS/rejected.jsonl (every
sample left out, with its id and reason). Train on it with `model.data.data_path=SHARDS` (or a pattern
such as `SHARDS/shard-{000000..000009}.tar`).
"""
import argparse
import logging
import sys

from nemo_neva.commands.conversion import add_source_args, data_source, written_report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(ap, "empty (or new) folder for the shards")
    ap.add_argument("--prefix", default="shard", help="shard file name prefix (default: shard)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    from nemo_neva.data.image_io import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
    from nemo_neva.data.shard_writer import convert_to_shards

    try:
        index = convert_to_shards(
            data_source(args), args.image_folder,
            args.output_dir, samples_per_shard=args.samples_per_shard, prefix=args.prefix,
            full_decode=not args.header_only, max_image_bytes=args.max_image_bytes or DEFAULT_MAX_BYTES,
            max_image_pixels=args.max_image_pixels or DEFAULT_MAX_PIXELS, video_folder=args.video_folder)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(written_report(f"{index['total']} samples", index, args.output_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
