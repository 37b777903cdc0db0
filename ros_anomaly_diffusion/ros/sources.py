"""Frames from a folder, a rosbag2 or a video file, for `replay` and `detect` (no rclpy).

`FrameSource(path)` picks the kind: a rosbag2 (a folder with metadata.yaml, or a .mcap/.db3
file), a video file (VIDEO_SUFFIXES, decoded by OpenCV), else an image folder (RUGD layout
or plain images, core/data.open_dataset). `iterate(on_error)` yields SourceFrame for every
readable frame and hands each unreadable one to on_error(index, which, err): one bad frame
never ends the stream.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from . import bag

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v")


@dataclass(frozen=True)
class SourceFrame:
    name: str  # file stem, or the index in a bag or video
    stamp_ns: int | None  # the recorded stamp (bags), else None
    frame_id: str | None  # the recorded frame_id (bags), else None
    rgb: np.ndarray  # uint8 (H, W, 3)


class FrameSource:
    def __init__(self, path: str | Path, bag_topic: str | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"source {self.path} does not exist")
        if bag.is_bag(self.path):
            self.kind = "bag"
            topics = bag.image_topics(self.path)
            self.bag_topic = bag.pick_image_topic(self.path, topics, bag_topic or None, option="bag_topic")
            self.length = topics[self.bag_topic][1]
            self.description = f"rosbag2 {self.path}"
        elif self.path.is_file() and self.path.suffix.lower() in VIDEO_SUFFIXES:
            self.kind = "video"
            cap = cv2.VideoCapture(str(self.path))
            if not cap.isOpened():
                raise ValueError(f"OpenCV cannot open the video {self.path}")
            self.length = max(int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), 0)
            cap.release()
            self.description = f"video {self.path}"
        elif self.path.is_dir():
            from ..core.data import open_dataset

            self.kind = "folder"
            self.dataset = open_dataset(self.path)
            self.length = len(self.dataset)
            self.description = f"image folder {self.path}"
        else:
            raise ValueError(f"{self.path} is neither an image folder, a rosbag2 nor a video file "
                             f"({', '.join(VIDEO_SUFFIXES)})")

    def iterate(self, on_error: Callable[[int, str, Exception], None]) -> Iterator[SourceFrame]:
        if self.kind == "bag":
            for i, (stamp, frame_id, rgb) in enumerate(bag.iter_bag_frames(
                    self.path, self.bag_topic, lambda k, t, err: on_error(k, f"bag time {t} ns", err))):
                yield SourceFrame(f"{i:06d}", stamp, frame_id, rgb)
        elif self.kind == "video":
            cap = cv2.VideoCapture(str(self.path))
            try:
                i = 0
                while True:
                    ok, bgr = cap.read()
                    if not ok:
                        break
                    yield SourceFrame(f"frame_{i:06d}", None, None, np.ascontiguousarray(bgr[..., ::-1]))
                    i += 1
            finally:
                cap.release()
        else:
            for i, frame in enumerate(self.dataset):
                try:
                    rgb = frame.rgb()
                except (OSError, ValueError) as err:
                    on_error(i, str(frame.image_path), err)
                    continue
                yield SourceFrame(frame.name, None, None, rgb)
