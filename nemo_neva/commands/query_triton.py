"""Ask a NeVA served through Triton (examples/neva_triton.py) one question about its images; prints the answer.

    neva-query-triton --url 127.0.0.1:8000 --model neva --image cat.png --prompt "What is this?"
    neva-query-triton --image a.png --image b.png --prompt "First <image>, then <image>: same cat?"
    neva-query-triton --video clip.mp4 --num-frames 8 --prompt "<video>\nWhich way does it move?"
    neva-query-triton --protocol grpc --url 127.0.0.1:8001 --image cat.png --prompt "..." \
        --temperature 0.7 --top-k 50 --top-p 0.9 --seed 3 --max-output-len 64

The request is the one NeMo 1's `query_multimodal` sends (input_text, input_media [1, 1, H, W, 3] RGB, INT64
max_output_len / top_k / num_beams, FP32 top_p / temperature / repetition_penalty), plus random_seed and, for
nv_steerlm models, SteerLM attributes (--steerlm quality:9,humor:2). Several --image: input_media [1, N, H, W, 3]
in the order given (the prompt's <image> tags, or none: the images lead); images of different sizes are
zero-padded to the largest height and width and their sizes sent as input_media_sizes [1, N, 2]. Greedy unless
--temperature > 0 and --top-k != 1. Exit status 1 with the server's message when the request is refused.

--video: Triton has no video tensor; a video travels as its sampled frames in `input_media` slots. The frames
are sampled here with nemo_neva's `open_video` (PyAV; --num-frames / --sampling must be the model's
`model.data.video` settings: the server takes `num_frames` slots per `<video>` tag and refuses another count)
and stand at the prompt's `<video>` tag (or a leading one), which the prompt keeps, so the server answers for
that video (its frames pooled where the model pools them) as `generate` does. The server's `limits.max_videos`
must allow it.
"""
import argparse
import re
import sys

import numpy as np


def media_tensors(images: list) -> "tuple[np.ndarray, np.ndarray | None]":
    """[H, W, 3] images -> (input_media [1, N, H, W, 3], input_media_sizes [1, N, 2] or None when all share
    one size): images of different sizes sit at the top-left of zero-padded slots of the largest H and W."""
    sizes = [im.shape[:2] for im in images]
    if len(set(sizes)) == 1:
        return np.stack(images)[np.newaxis], None
    h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
    media = np.zeros((1, len(images), h, w, 3), np.uint8)
    for k, im in enumerate(images):
        media[0, k, :im.shape[0], :im.shape[1]] = im
    return media, np.array([sizes], dtype=np.int64)


def build_inputs(client_module, prompt: str, images: list, args) -> list:
    """tritonclient InferInput objects for one request (one row); `images`: RGB arrays, in <image> order."""
    def tensor(name, array, dtype):
        t = client_module.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        return t

    inputs = [tensor("input_text", np.array([[prompt.encode("utf-8")]], dtype=np.object_), "BYTES")]
    if images:
        media, sizes = media_tensors(images)
        inputs.append(tensor("input_media", media, "UINT8"))
        if sizes is not None:
            inputs.append(tensor("input_media_sizes", sizes, "INT64"))
    scalars = [("max_output_len", args.max_output_len, np.int64, "INT64"),
               ("top_k", args.top_k, np.int64, "INT64"),
               ("top_p", args.top_p, np.float32, "FP32"),
               ("temperature", args.temperature, np.float32, "FP32"),
               ("repetition_penalty", args.repetition_penalty, np.float32, "FP32"),
               ("num_beams", args.num_beams, np.int64, "INT64"),
               ("random_seed", args.seed, np.int64, "INT64")]
    for name, value, np_type, dtype in scalars:
        if value is not None:
            inputs.append(tensor(name, np.array([[value]], dtype=np_type), dtype))
    for name, value in _steerlm(args.steerlm).items():
        inputs.append(tensor(name, np.array([[value]], dtype=np.int32), "INT32"))
    return inputs


def _steerlm(spec: "str | None") -> dict:
    out = {}
    for part in filter(None, (spec or "").split(",")):
        name, _, value = part.partition(":")
        if not value.strip().lstrip("-").isdigit():
            raise SystemExit(f"--steerlm: {part!r} is not name:value")
        out[name.strip()] = int(value)
    return out


def video_media(prompt: str, images: list, video_path: str, num_frames: int, sampling: str) -> "tuple[str, list]":
    """(prompt, media slots): the prompt with its `<video>` tag (a leading one when it has none) and the video's
    sampled frames in the slots at that tag's place; `images` (one per `<image>` tag, or leading) keep their
    places. A bad video: SystemExit with open_video's one-line reason."""
    from nemo_neva.data.constants import IMAGE_TOKEN, VIDEO_TOKEN
    from nemo_neva.data.video_io import VideoError, VideoSettings, open_video

    try:
        video = open_video(video_path, VideoSettings(num_frames, sampling))
    except (VideoError, ValueError) as e:
        raise SystemExit(f"--video: {e}") from None
    if prompt.count(VIDEO_TOKEN) > 1:
        raise SystemExit(f"--prompt: one {VIDEO_TOKEN} tag for the one --video")
    if VIDEO_TOKEN not in prompt:
        prompt = f"{VIDEO_TOKEN}\n{prompt}"
    if images and IMAGE_TOKEN not in prompt:  # the images lead, as the server would place them
        prompt = "\n".join([IMAGE_TOKEN] * len(images) + [prompt])
    k = prompt.split(VIDEO_TOKEN)[0].count(IMAGE_TOKEN)
    frames = [np.asarray(f, dtype=np.uint8) for f in video.frames]
    return prompt, images[:k] + frames + images[k:]


def load_image(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def client_for(protocol: str):
    if protocol == "grpc":
        import tritonclient.grpc as module
    else:
        import tritonclient.http as module
    return module


def query(url: str, model: str, prompt: str, images: list, args, protocol: str = "http",
          timeout: float = 300.0) -> str:
    module = client_for(protocol)
    if protocol == "grpc":
        client = module.InferenceServerClient(url)
        kwargs = {"client_timeout": timeout}
    else:
        client = module.InferenceServerClient(url, connection_timeout=timeout, network_timeout=timeout)
        kwargs = {}
    try:
        result = client.infer(model, build_inputs(module, prompt, images, args),
                              outputs=[module.InferRequestedOutput("outputs")], **kwargs)
        return result.as_numpy("outputs")[0, 0].decode("utf-8")
    finally:
        client.close()


def server_error(e) -> str:
    """The reason in a Triton error: our model's InvalidInput line when there is one (PyTriton wraps it in
    the backend's own traceback text), else Triton's message."""
    message = e.message() if callable(getattr(e, "message", None)) else str(e)
    found = re.search(r"InvalidInput: (.+)", message)
    return found.group(1).strip() if found else message.strip()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="host:port (default 127.0.0.1:8000 for http, :8001 for grpc)")
    ap.add_argument("--protocol", choices=["http", "grpc"], default="http")
    ap.add_argument("--model", default="neva", help="Triton model name (triton.model_name)")
    ap.add_argument("--image", action="append", default=[], help="image file; repeat for several, in the "
                    "order of the prompt's <image> tags (omit for a text-only prompt)")
    ap.add_argument("--video", default=None, help="video file: its frames go as images at the prompt's <video> "
                    "tag (leading without one); needs nemo_neva and PyAV")
    ap.add_argument("--num-frames", type=int, default=8, help="frames sampled from --video (the model's "
                    "model.data.video.num_frames)")
    ap.add_argument("--sampling", choices=["uniform", "first"], default="uniform",
                    help="how --video's frames are picked (the model's model.data.video.sampling)")
    ap.add_argument("--prompt", required=True, help="the question")
    ap.add_argument("--max-output-len", type=int, default=None, help="new tokens (default: the server's cap)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=None, help="0 = off, 1 = greedy")
    ap.add_argument("--top-p", type=float, default=None, help="nucleus mass; 0 or 1 = off")
    ap.add_argument("--repetition-penalty", type=float, default=None, help="1 = off")
    ap.add_argument("--num-beams", type=int, default=None, help="only 1 is served")
    ap.add_argument("--seed", type=int, default=None, help="random_seed: reproducible sampling")
    ap.add_argument("--steerlm", default=None, help="SteerLM attributes, e.g. quality:9,humor:2 (nv_steerlm)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds")
    ap.add_argument("--concurrent", type=int, default=1, metavar="N",
                    help="send the request N times at once (Triton batches them); one answer per line, in order")
    args = ap.parse_args(argv)
    url = args.url or ("127.0.0.1:8001" if args.protocol == "grpc" else "127.0.0.1:8000")
    try:
        images = [load_image(path) for path in args.image]
    except OSError as e:  # missing or not an image
        ap.error(f"--image: {e}")
    prompt = args.prompt
    if args.video is not None:
        prompt, images = video_media(prompt, images, args.video, args.num_frames, args.sampling)

    from tritonclient.utils import InferenceServerException

    if args.concurrent < 1:
        ap.error("--concurrent must be >= 1")
    try:
        if args.concurrent == 1:
            answer = query(url, args.model, prompt, images, args, args.protocol, args.timeout)
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(args.concurrent) as pool:
                answers = list(pool.map(lambda _: query(url, args.model, prompt, images, args, args.protocol,
                                                        args.timeout), range(args.concurrent)))
            answer = "\n".join(answers)
    except InferenceServerException as e:
        print(f"error: {server_error(e)}", file=sys.stderr)
        return 1
    except OSError as e:  # refused / unreachable / timed out
        print(f"error: cannot reach Triton at {url} ({args.protocol}): {e}", file=sys.stderr)
        return 1
    print(answer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
