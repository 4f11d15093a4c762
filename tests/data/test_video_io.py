"""Video decoding with limits (data/video_io.py). Oracle: transformers' own PyAV video loader
(`transformers.video_utils.load_video`, uniform sampling) on the same file; the files are written here
with PyAV, losslessly, so the decoded frames must also be exactly the frames that were drawn."""
import io
import os

import numpy as np
import pytest
from omegaconf import OmegaConf

from nemo_neva.data.constants import IMAGE_TOKEN, VIDEO_TOKEN
from nemo_neva.data.image_io import ImageError
from nemo_neva.data.video_io import (Video, VideoError, VideoSettings, expand_media, expand_video_tags,
                                     open_video, sample_indices, video_settings_of)
from nemo_neva.data.video_writer import write_video
from tests.optional import require
from nemo_neva.cli import shipped_config

av = require("av")


def solid_frames(n, h=24, w=40, seed=0):
    """n frames of distinct solid colours (any two differ in some channel)."""
    rng = np.random.default_rng(seed)
    colours = rng.choice(256 ** 3, size=n, replace=False)
    return [np.broadcast_to(np.array([c >> 16, (c >> 8) & 255, c & 255], np.uint8), (h, w, 3)).copy()
            for c in colours]


@pytest.fixture(scope="module")
def mp4(tmp_path_factory):
    frames = solid_frames(11)
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_video(path, frames, container="mp4")
    return str(path), frames


@pytest.mark.parametrize("num_frames", [1, 4, 11])
def test_uniform_frames_equal_transformers_load_video(mp4, num_frames):
    from transformers.video_utils import load_video

    path, drawn = mp4
    theirs, meta = load_video(path, num_frames=num_frames, backend="pyav")
    ours = open_video(path, VideoSettings(num_frames, "uniform"))
    assert ours.indices == [int(i) for i in meta.frames_indices] and ours.total_frames == len(drawn)
    assert len(ours.frames) == num_frames
    got = np.stack([np.asarray(f) for f in ours.frames])
    np.testing.assert_array_equal(got, theirs)
    np.testing.assert_array_equal(got, np.stack([drawn[i] for i in ours.indices]))  # lossless file


@pytest.mark.parametrize("container", ["matroska", "avi"])
def test_other_containers_sources_and_first_sampling(tmp_path, container):
    drawn = solid_frames(7, seed=3)
    path = tmp_path / "clip.vid"  # the format is sniffed from the bytes, not the name
    write_video(path, drawn, container=container)
    data = path.read_bytes()
    for src in (str(path), data, io.BytesIO(data)):
        video = open_video(src, VideoSettings(3, "first"))
        assert video.indices == [0, 1, 2] and video.total_frames == 7
        np.testing.assert_array_equal(np.stack([np.asarray(f) for f in video.frames]), np.stack(drawn[:3]))


def test_a_short_video_repeats_frames_to_keep_the_placeholder_count(tmp_path):
    drawn = solid_frames(3, seed=5)
    write_video(tmp_path / "short.mp4", drawn)
    video = open_video(str(tmp_path / "short.mp4"), VideoSettings(8))
    assert len(video.frames) == 8 and video.indices == sorted(video.indices) and set(video.indices) == {0, 1, 2}
    for frame, i in zip(video.frames, video.indices):
        np.testing.assert_array_equal(np.asarray(frame), drawn[i])
    first = open_video(str(tmp_path / "short.mp4"), VideoSettings(5, "first"))
    assert first.indices == [0, 1, 2, 2, 2]


def _error(src, **kw) -> VideoError:
    with pytest.raises(VideoError) as info:
        open_video(src, **kw)
    err = info.value
    assert isinstance(err, ImageError) and "\n" not in str(err) and "Traceback" not in str(err)
    return err


def test_bad_videos_are_one_line_errors_with_a_reason(mp4, tmp_path):
    path, _ = mp4
    data = open(path, "rb").read()
    assert _error(b"not a video at all, just some bytes").reason == "bad_format"
    assert _error(b"\x00\x00\x00\x18ftypisom" + os.urandom(2000)).reason == "corrupt"
    assert _error(data[: len(data) // 3]).reason == "corrupt"  # cut off mid-file
    assert _error(str(tmp_path / "nope.mp4")).reason == "missing"
    assert _error(path, max_bytes=len(data) - 1).reason == "too_large"
    assert _error(path, max_frames=10).reason == "too_many_frames"  # 11 frames in the file
    # 4 uniform frames of 11 decode the frames up to the last one picked: one pixel less is refused up front
    pixels = (sample_indices(11, 4)[-1] + 1) * 24 * 40
    assert _error(path, settings=VideoSettings(4), max_pixels=pixels - 1).reason == "too_many_pixels"
    assert len(open_video(path, VideoSettings(4), max_pixels=pixels).frames) == 4
    write_video(tmp_path / "empty.avi", [], container="avi")  # a video stream without frames
    assert _error(str(tmp_path / "empty.avi")).reason == "no_frames"
    write_video(tmp_path / "empty.mp4", [], container="mp4")  # mp4 drops a stream without samples
    assert _error(str(tmp_path / "empty.mp4")).reason == "no_video"
    write_video(tmp_path / "empty.mkv", [], container="matroska")  # FFmpeg: "End of file" while opening
    assert _error(str(tmp_path / "empty.mkv")).reason == "corrupt"


def test_settings_and_sampling_are_validated():
    with pytest.raises(ValueError, match="num_frames must be an integer >= 1"):
        VideoSettings(0)
    with pytest.raises(ValueError, match="sampling must be one of"):
        VideoSettings(4, "fps")
    with pytest.raises(VideoError, match="no_frames"):
        sample_indices(0, 4)


@pytest.mark.parametrize("conf", ["neva_pretrain", "neva_finetune"])
def test_settings_come_from_the_model_data_config(conf):
    model_cfg = shipped_config(conf).model
    video = model_cfg.data.video
    assert video_settings_of(model_cfg) == VideoSettings(video.num_frames, video.sampling)
    assert video_settings_of(model_cfg, num_frames=3) == VideoSettings(3, video.sampling)
    assert video_settings_of(OmegaConf.create({"data": {}})) == VideoSettings()  # a .nemo from before video


def test_video_tags_expand_to_one_image_tag_per_frame():
    assert expand_video_tags(f"{VIDEO_TOKEN}\nWhich way?", 3) == f"{IMAGE_TOKEN * 3}\nWhich way?"
    image, frames = object(), ["f0", "f1"]
    text, images = expand_media(f"A {IMAGE_TOKEN} then {VIDEO_TOKEN}.", [image, Video(frames, [0, 5], 9)])
    assert text == f"A {IMAGE_TOKEN} then {IMAGE_TOKEN * 2}." and images == [image, *frames]
    with pytest.raises(ValueError, match="tag 1 is <video> but its item is not a video"):
        expand_media(f"{VIDEO_TOKEN}", [image])
    with pytest.raises(ValueError, match="2 <image>/<video> tag"):
        expand_media(f"{VIDEO_TOKEN}{IMAGE_TOKEN}", [image])
