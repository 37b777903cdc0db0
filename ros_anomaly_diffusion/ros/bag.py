"""rosbag2 files without a ROS installation (the `rosbags` library).

* `folder_to_bag`: a RUGD-format or plain image folder -> a rosbag2 (sqlite3 or mcap) with
  one sensor_msgs/msg/Image (rgb8) topic, so recorded datasets can be fed to the detector
  on a robot with `ros2 bag play`. Messages are serialised with the ROS 2 Humble type store
  (sensor_msgs/Image and std_msgs/Header are identical in every ROS 2 distribution) and the
  bag is written in rosbag2 format version 8, which Humble and later read.
* `iter_bag_frames` / `iter_bag_images`: the frames of an Image or CompressedImage topic of
  any rosbag2 as RGB arrays, for replay and offline evaluation; undecodable messages are
  reported and skipped. `pick_image_topic` is the rule for which topic that is.
* `bag_frames(path, topic=None) -> list[BagFrame]`: the messages of that image topic as lazy
  frames for `core.datasets.FrameDataset` (training straight from bags): indexing reads no
  image, `BagFrame.rgb()` reads and decodes its one message.
* `bag_main(argv)`: the `ros-anomaly-diffusion bag` subcommand.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import os
import sys
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import image_codec

IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_TYPE = "sensor_msgs/msg/CompressedImage"
IMAGE_TYPES = (IMAGE_TYPE, COMPRESSED_TYPE)
STORAGES = ("sqlite3", "mcap")
BAG_VERSION = 8

log = logging.getLogger(__name__)

# on_error(index of the message on the topic, bag time in ns, the error)
OnError = Callable[[int, int, Exception], None]


def _typestore():
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_HUMBLE)


def absolute_topic(topic: str) -> str:
    """Bags record topic names fully qualified: "camera/image" names "/camera/image"."""
    return topic if topic.startswith("/") else "/" + topic


def is_bag(path: str | Path) -> bool:
    """A rosbag2 folder (metadata.yaml) or a single .db3 / .mcap file."""
    p = Path(path)
    return (p.is_dir() and (p / "metadata.yaml").is_file()) or (p.is_file() and p.suffix in (".db3", ".mcap"))


def folder_to_bag(folder: str | Path, out: str | Path, topic: str = "/camera/image", rate_hz: float = 5.0,
                  storage: str = "sqlite3", frame_id: str = "camera", count: int | None = None,
                  start_ns: int = 1_700_000_000 * 10**9) -> int:
    """Write the folder's frames (sorted by name) as rgb8 Images, `1/rate_hz` s apart,
    header stamp = bag time = start_ns + i / rate_hz. Returns the number of frames written."""
    from rosbags.rosbag2 import StoragePlugin, Writer

    from ..core.data import open_dataset

    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    if not rate_hz > 0:
        raise ValueError(f"rate_hz must be > 0, got {rate_hz}")
    topic = absolute_topic(topic)
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"bag output {out} already exists; choose a new path")
    frames = list(open_dataset(folder))
    if count is not None:
        frames = frames[: max(0, int(count))]
    if not frames:
        raise ValueError(f"no frames to write from {folder}")
    store = _typestore()
    Image = store.types[IMAGE_TYPE]
    Header = store.types["std_msgs/msg/Header"]
    Time = store.types["builtin_interfaces/msg/Time"]
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    period_ns = int(round(1e9 / rate_hz))
    with Writer(out, version=BAG_VERSION, storage_plugin=plugin) as writer:
        conn = writer.add_connection(topic, IMAGE_TYPE, typestore=store)
        for i, frame in enumerate(frames):
            rgb = np.ascontiguousarray(frame.rgb(), dtype=np.uint8)
            t = start_ns + i * period_ns
            h, w = rgb.shape[:2]
            msg = Image(header=Header(stamp=Time(sec=t // 10**9, nanosec=t % 10**9), frame_id=frame_id),
                        height=h, width=w, encoding="rgb8", is_bigendian=0, step=w * 3,
                        data=rgb.reshape(-1))
            writer.write(conn, t, store.serialize_cdr(msg, IMAGE_TYPE))
    return len(frames)


def image_topics(path: str | Path) -> dict[str, tuple[str, int]]:
    """{topic: (message type, message count)} of the bag's Image / CompressedImage topics."""
    from rosbags.rosbag2 import Reader

    with Reader(path) as reader:
        return {c.topic: (c.msgtype, c.msgcount) for c in reader.connections if c.msgtype in IMAGE_TYPES}


def _decode(store, msgtype: str, raw: bytes):
    """(message, uint8 RGB) of one serialised Image / CompressedImage."""
    msg = store.deserialize_cdr(raw, msgtype)
    return msg, (image_codec.image_to_rgb(msg) if msgtype == IMAGE_TYPE else image_codec.compressed_to_rgb(msg))


def pick_image_topic(path: str | Path, topics: Iterable[str], topic: str | None = None,
                     option: str = "topic=") -> str:
    """The image topic to read among the bag's image `topics`: `topic` if given (it must be one of
    them), else the only one; a ValueError names them otherwise (and `option`, how to choose)."""
    topics = sorted(set(topics))
    if topic is not None:
        want = absolute_topic(topic)
        if want not in topics:
            raise ValueError(f"bag {path} has no Image/CompressedImage topic {want!r}; image topics: {topics}")
        return want
    if len(topics) != 1:
        raise ValueError(f"bag {path} has {'no' if not topics else 'several'} image topics {topics}; "
                         f"choose one with {option}")
    return topics[0]


def iter_bag_frames(path: str | Path, topic: str | None = None,
                    on_error: OnError | None = None) -> Iterator[tuple[int, str, np.ndarray]]:
    """(header stamp in ns (the bag time if the stamp is zero), frame_id, uint8 RGB) per message.

    `topic` None: the bag's only image topic (ValueError listing them if there are several).
    A message that cannot be deserialised or decoded is skipped, never ends the iteration:
    `on_error(index, bag_time_ns, err)` is called with it, or a warning is logged when
    on_error is None. Errors of the bag itself (missing, unreadable storage) still raise."""
    from rosbags.rosbag2 import Reader
    from rosbags.serde import SerdeError

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"bag {path} does not exist")
    store = _typestore()
    with Reader(path) as reader:
        conns = [c for c in reader.connections if c.msgtype in IMAGE_TYPES]
        want = pick_image_topic(path, (c.topic for c in conns), topic)
        conns = [c for c in conns if c.topic == want]
        for index, (conn, bag_time, raw) in enumerate(reader.messages(connections=conns)):
            try:
                msg, rgb = _decode(store, conn.msgtype, raw)
            except (SerdeError, ValueError) as err:  # image_codec.FrameError is a ValueError
                if on_error is None:
                    log.warning("skipping undecodable message %d (bag time %d ns) on %s in %s: %s",
                                index, bag_time, conn.topic, path, err)
                else:
                    on_error(index, int(bag_time), err)
                continue
            stamp = int(msg.header.stamp.sec) * 10**9 + int(msg.header.stamp.nanosec)
            yield (stamp or int(bag_time)), str(msg.header.frame_id), rgb


def iter_bag_images(path: str | Path, topic: str | None = None,
                    on_error: OnError | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(stamp in ns, uint8 RGB) per message of the bag's image topic; see iter_bag_frames."""
    for stamp, _frame_id, rgb in iter_bag_frames(path, topic, on_error):
        yield stamp, rgb


# --------------------------------------------------------------------------- lazy frames of a bag

# Open Readers, (pid, bag) -> Reader, least recently used first. Keyed by the process id: a
# DataLoader worker forked from a process that had a bag open inherits its Reader, whose file
# offset (mcap) or SQLite connection it must not use; it opens its own. Inherited entries are
# left alone (closing them in the child could disturb the parent's). One lock serialises the
# cache and the reads of a process (an mcap Reader seeks in one shared file object); a child
# gets a fresh lock, in case another thread held it at the fork.
_READERS: OrderedDict = OrderedDict()
_READERS_LOCK = threading.RLock()
MAX_OPEN_BAGS = 16  # per process; more bags than this are reopened as they come round


def _fresh_lock() -> None:
    global _READERS_LOCK
    _READERS_LOCK = threading.RLock()


os.register_at_fork(after_in_child=_fresh_lock)


def bag_reader(bag: Path):
    """This process's open Reader of `bag` (opened on first use, never one a parent process
    opened before a fork). Hold _READERS_LOCK (reentrant) while reading from it: another
    thread's call may close it when more than MAX_OPEN_BAGS are open."""
    from rosbags.rosbag2 import Reader

    with _READERS_LOCK:
        pid = os.getpid()
        key = (pid, bag)
        reader = _READERS.get(key)
        if reader is not None:
            _READERS.move_to_end(key)
            return reader
        reader = Reader(bag)
        reader.open()
        _READERS[key] = reader
        own = [k for k in _READERS if k[0] == pid]
        for old in own[:-MAX_OPEN_BAGS]:
            _READERS.pop(old).close()
        return reader


@dataclass(frozen=True)
class BagFrame:
    """One message of a bag's image topic, read and decoded only by `rgb()` (a frame-like for
    `core.datasets.FrameDataset`). `timestamp` is its bag time (ns), `index` its position on the
    topic (as `iter_bag_frames` counts), `tie` its position among the topic's messages with the
    same bag time (0 unless several share it)."""

    name: str
    bag: Path
    topic: str
    timestamp: int
    index: int
    tie: int = 0
    label_path = None  # no annotation: the frame-like interface of core.data.Frame (an unlabelled one)

    def is_ood(self, min_pixels: int = 0) -> None:
        return None

    def rgb(self) -> np.ndarray:
        """uint8 (H, W, 3) RGB of this message. ValueError when it cannot be deserialised or
        decoded (or is no longer in the bag); errors of the bag itself (missing, unreadable) as
        rosbags raises them."""
        with _READERS_LOCK:
            reader = bag_reader(self.bag)
            conns = [c for c in reader.connections if c.topic == self.topic and c.msgtype in IMAGE_TYPES]
            if not conns:  # (no connections would mean no filter at all to Reader.messages)
                raise ValueError(f"bag {self.bag} has no Image/CompressedImage topic {self.topic!r}")
            # a time window of one nanosecond: every message of the topic at this bag time, in the
            # order the full read gives them (mcap: chunk offset, then record order; sqlite3: the
            # timestamp index, so row order)
            window = reader.messages(connections=conns, start=self.timestamp, stop=self.timestamp + 1)
            try:
                found = next(itertools.islice(window, self.tie, None), None)
            finally:
                window.close()
        if found is None:
            raise ValueError(f"{self.name}: no message {self.tie} at bag time {self.timestamp} ns on {self.topic} "
                             f"in {self.bag} (the bag changed since it was indexed?)")
        conn, _, raw = found
        try:
            return _decode(_typestore(), conn.msgtype, raw)[1]
        except Exception as err:  # message bytes are data: any failure to read them is a bad message
            raise ValueError(f"undecodable message {self.index} (bag time {self.timestamp} ns) on {self.topic} "
                             f"in {self.bag}: {type(err).__name__}: {err}") from err

    def label(self) -> None:
        return None


def bag_frames(path: str | Path, topic: str | None = None) -> list[BagFrame]:
    """Every message of the bag's image topic (`pick_image_topic`'s rule) as a `BagFrame`
    named f"{bag stem}_{index:06d}", in bag order. One pass that decodes no image (rosbags
    still reads each message's bytes)."""
    from rosbags.rosbag2 import Reader

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"bag {path} does not exist")
    bag = path.resolve()  # workers may run elsewhere; the cache key is the same for every frame
    stem = bag.stem if bag.is_file() else bag.name
    with Reader(path) as reader:
        conns = [c for c in reader.connections if c.msgtype in IMAGE_TYPES]
        want = pick_image_topic(path, (c.topic for c in conns), topic)
        conns = [c for c in conns if c.topic == want]
        ties: Counter[int] = Counter()
        frames = []
        for index, (_conn, bag_time, _raw) in enumerate(reader.messages(connections=conns)):
            t = int(bag_time)
            frames.append(BagFrame(f"{stem}_{index:06d}", bag, want, t, index, ties[t]))
            ties[t] += 1
    return frames


def bag_main(argv: list[str] | None = None) -> int:
    """`ros-anomaly-diffusion bag --data DIR --out BAG [--storage mcap] [--topic T] [--rate HZ]`."""
    ap = argparse.ArgumentParser(prog="ros-anomaly-diffusion bag",
                                 description="Write an image folder (RUGD format or plain) as a rosbag2 "
                                             "with one sensor_msgs/Image (rgb8) topic, for ros2 bag play.")
    ap.add_argument("--data", required=True, help="RUGD-format folder or folder of images")
    ap.add_argument("--out", required=True, help="bag folder to create (must not exist)")
    ap.add_argument("--storage", choices=STORAGES, default="sqlite3", help="rosbag2 storage plugin")
    ap.add_argument("--topic", default="/camera/image", help="image topic name")
    ap.add_argument("--rate", type=float, default=5.0, help="frames per second (spacing of the stamps)")
    ap.add_argument("--frame-id", default="camera", help="header frame_id")
    ap.add_argument("--count", type=int, default=None, help="write only the first N frames")
    args = ap.parse_args(argv)
    try:
        n = folder_to_bag(args.data, args.out, args.topic, args.rate, args.storage, args.frame_id, args.count)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {n} frames to {args.out} ({args.storage}, topic {absolute_topic(args.topic)}, {args.rate:g} Hz); "
          f"play it with: ros2 bag play {args.out}")
    return 0
