"""What the two LLaVA-record converters (`neva-convert-shards`, `neva-convert-energon`) share: their source and
check options, and the one-line report of what was written and what was left out."""
import argparse
import os


def add_source_args(ap: argparse.ArgumentParser, output_help: str) -> None:
    """The records, media folders, output folder and image checks every converter takes."""
    ap.add_argument("--data-path", required=True, nargs="+", help="LLaVA JSON or JSONL file(s)")
    ap.add_argument("--image-folder", default=None, help="image folder or uncompressed .tar")
    ap.add_argument("--video-folder", default=None, help="video folder or uncompressed .tar (default: the "
                                                             "image folder)")
    ap.add_argument("--output-dir", required=True, help=output_help)
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    ap.add_argument("--header-only", action="store_true",
                    help="check image headers and video packets only instead of decoding every image and "
                         "each video's sampled frames (faster)")
    ap.add_argument("--max-image-bytes", type=int, default=None)
    ap.add_argument("--max-image-pixels", type=int, default=None)


def data_source(args: argparse.Namespace):
    """One records file as a path, several as a list (what the writers take)."""
    return args.data_path if len(args.data_path) > 1 else args.data_path[0]


def written_report(what: str, index: dict, output_dir: str) -> str:
    """'wrote <what> in N shards to DIR; left out K of M records (reason=count, ...)' + where the rejects are."""
    left_out = sum(index["skipped"].values())
    reasons = ", ".join(f"{k}={v}" for k, v in index["skipped"].items()) or "none"
    return (f"wrote {what} in {len(index['shards'])} shards to {output_dir}; "
            f"left out {left_out} of {index['records']} records ({reasons})"
            + (f"; see {os.path.join(output_dir, 'rejected.jsonl')}" if left_out else ""))
