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
import os
import sys



def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-path", required=True, nargs="+", help="LLaVA JSON or JSONL file(s)")
    ap.add_argument("--image-folder", default=None, help="image folder or uncompressed .tar")
    ap.add_argument("--video-folder", default=None, help="video folder or uncompressed .tar (default: the "
                                                             "image folder)")
    ap.add_argument("--output-dir", required=True, help="empty (or new) folder for the shards")
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    ap.add_argument("--prefix", default="shard", help="shard file name prefix (default: shard)")
    ap.add_argument("--header-only", action="store_true",
                    help="check image headers and video packets only instead of decoding every image and "
                         "each video's sampled frames (faster)")
    ap.add_argument("--max-image-bytes", type=int, default=None)
    ap.add_argument("--max-image-pixels", type=int, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    from nemo_neva.data.image_io import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
    from nemo_neva.data.shard_writer import convert_to_shards

    try:
        index = convert_to_shards(
            args.data_path if len(args.data_path) > 1 else args.data_path[0], args.image_folder,
            args.output_dir, samples_per_shard=args.samples_per_shard, prefix=args.prefix,
            full_decode=not args.header_only, max_image_bytes=args.max_image_bytes or DEFAULT_MAX_BYTES,
            max_image_pixels=args.max_image_pixels or DEFAULT_MAX_PIXELS, video_folder=args.video_folder)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    left_out = sum(index["skipped"].values())
    reasons = ", ".join(f"{k}={v}" for k, v in index["skipped"].items()) or "none"
    print(f"wrote {index['total']} samples in {len(index['shards'])} shards to {args.output_dir}; "
          f"left out {left_out} of {index['records']} records ({reasons})"
          + (f"; see {os.path.join(args.output_dir, 'rejected.jsonl')}" if left_out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
