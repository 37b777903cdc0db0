"""Lazy training data (core.datasets) and lazy bag frames (ros.bag.bag_frames), on real RUGD frames."""
from __future__ import annotations

import logging
import os
import shutil

import cv2
import numpy as np
import pytest
import torch

from ros_anomaly_diffusion.core.data import IGNORE, OOD, open_dataset
from ros_anomaly_diffusion.core.datasets import FrameDataset, collate_frames, frame_loader
from ros_anomaly_diffusion.ros import bag

# DataLoader workers that deadlock fail fast rather than at the suite's 600 s limit
pytestmark = pytest.mark.timeout(120)

SIZE = (64, 80)
START = 1_700_000_000 * 10**9


@pytest.fixture(autouse=True)
def _restore_sigchld():
    """A DataLoader with workers leaves torch's Python SIGCHLD handler installed for the rest of
    the process. In the test process, where OpenVINO is loaded later (test_deploy), a child
    process's exit then crashes the interpreter (SIGSEGV in the eval loop: reproduced with one
    worker test, the OpenVINO parity test and any test that runs a subprocess; gone with the
    default handler). The package never has both in one process (training has no OpenVINO, the
    node no DataLoader workers), so the tests put the handler back and let torch set it again."""
    import signal

    from torch.utils.data._utils import signal_handling

    before = signal.getsignal(signal.SIGCHLD)
    yield
    signal.signal(signal.SIGCHLD, before)
    signal_handling._SIGCHLD_handler_set = False


# The in-memory preparation the families used before streaming (fitting.load_frames and
# feature_space.cell_weights as of eaffb15), kept here as the reference FrameDataset must match.
def load_frames(frames, size):
    h, w = size
    images, weights = [], []
    for f in frames:
        images.append(cv2.resize(f.rgb(), (w, h), interpolation=cv2.INTER_AREA))
        label = f.label()
        weights.append(np.ones((h, w), np.float32) if label is None else
                       (cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST) != OOD).astype(np.float32))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return x, torch.from_numpy(np.stack(weights)).unsqueeze(1)


def cell_weights(label, grid):
    gh, gw = grid
    if label is None:
        return torch.ones(1, 1, gh, gw)
    coverage = cv2.resize((label == OOD).astype(np.float32), (gw, gh), interpolation=cv2.INTER_AREA)
    return torch.from_numpy((coverage <= 0).astype(np.float32))[None, None]


def _epoch(loader):
    batches = list(loader)
    return batches, sum(b.skipped for b in batches), sorted(i for b in batches for i in b.indices.tolist())


# --------------------------------------------------------------------------- FrameDataset, collate_frames


def test_samples_equal_load_frames(rugd_sample):
    frames = list(open_dataset(rugd_sample))
    x, wgt = load_frames(frames, SIZE)
    data = FrameDataset(frames, SIZE)
    s = data[0]
    assert (s.image.dtype, tuple(s.image.shape), s.weight.dtype, tuple(s.weight.shape), s.index) == (
        torch.uint8, (3, *SIZE), torch.float32, (1, *SIZE), 0)
    batch = collate_frames([data[i] for i in range(len(data))])
    assert batch.skipped == 0 and batch.indices.tolist() == list(range(len(frames)))
    assert batch.images.dtype == torch.float32
    torch.testing.assert_close(batch.images, x, atol=1 / 255, rtol=0)
    assert torch.equal(batch.weights, wgt)
    # weight 0 exactly on the OOD pixels of the (nearest-resized) label, 1 on ID and ignored ones
    ood = np.stack([cv2.resize(f.label(), SIZE[::-1], interpolation=cv2.INTER_NEAREST) == OOD for f in frames])
    assert ood.sum() > 100  # the sample has OOD objects: the check below is not vacuous
    assert torch.equal(batch.weights[:, 0] == 0, torch.from_numpy(ood))


def test_weight_grid_gives_cell_weights(rugd_sample):
    frames = list(open_dataset(rugd_sample))[:3] + [_Stub("unlabelled", open_dataset(rugd_sample)[3].rgb())]
    grid = (SIZE[0] // 8, SIZE[1] // 8)
    batch = collate_frames([FrameDataset(frames, SIZE, weight_grid=grid)[i] for i in range(len(frames))])
    ref = torch.cat([cell_weights(f.label(), grid) for f in frames])
    assert tuple(batch.weights.shape) == (4, 1, *grid) and torch.equal(batch.weights, ref)
    assert (ref[:3] == 0).any() and (ref[3] == 1).all()  # OOD cells in the labelled frames
    torch.testing.assert_close(batch.images, load_frames(frames, SIZE)[0], atol=1 / 255, rtol=0)


def test_size_none_keeps_the_frame_size_and_ignored_pixels_weigh_1(rugd_sample):
    frame = open_dataset(rugd_sample)[0]  # creek_02001: has OOD pixels
    label = frame.label().copy()
    label[:100, :120] = IGNORE  # (the sample has hardly any void pixels of its own)
    stub = _Stub("with_void", frame.rgb(), label)
    s, v = FrameDataset([frame, stub], None)[0], FrameDataset([frame, stub], None)[1]
    np.testing.assert_array_equal(s.image.permute(1, 2, 0).numpy(), frame.rgb())
    np.testing.assert_array_equal(s.weight[0].numpy(), (frame.label() != OOD).astype(np.float32))
    assert (v.weight[0, :100, :120] == 1).all()
    np.testing.assert_array_equal(v.weight[0].numpy(), (label != OOD).astype(np.float32))
    assert torch.equal(FrameDataset([stub], SIZE)[0].weight[None], load_frames([stub], SIZE)[1])


def _folder_with_corrupt_frames(tmp_path, rugd_sample, n=6, bad=(2, 3)):
    """n RUGD images copied into a plain folder (f0..f{n-1}); those at `bad` garbage / cut short."""
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(list(open_dataset(rugd_sample))[:n]):
        shutil.copy(f.image_path, folder / f"f{i}.png")
    (folder / f"f{bad[0]}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(2000))
    good = (folder / f"f{bad[1]}.png").read_bytes()
    (folder / f"f{bad[1]}.png").write_bytes(good[: len(good) // 2])
    return open_dataset(folder)


def test_corrupt_frames_are_skipped_counted_and_logged_once(tmp_path, rugd_sample, caplog):
    frames = _folder_with_corrupt_frames(tmp_path, rugd_sample)
    data = FrameDataset(frames, SIZE)
    with caplog.at_level(logging.WARNING, logger="ros_anomaly_diffusion"):
        samples = [data[i] for i in range(len(data))]
        assert data[2] is None  # again: no second warning
    assert [s is None for s in samples] == [False, False, True, True, False, False]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "f2" in warnings[0] and "cannot read image file" in warnings[0]
    assert "f3" in warnings[1]
    batch = collate_frames(samples)
    assert batch.skipped == 2 and batch.indices.tolist() == [0, 1, 4, 5]
    assert tuple(batch.images.shape) == (4, 3, *SIZE) and tuple(batch.weights.shape) == (4, 1, *SIZE)
    empty = collate_frames([None, None])
    assert empty.skipped == 2 and empty.images.shape[0] == empty.weights.shape[0] == len(empty.indices) == 0
    assert empty.indices.dtype == torch.int64


def test_skipped_counts_come_back_from_worker_processes(tmp_path, rugd_sample):
    data = FrameDataset(_folder_with_corrupt_frames(tmp_path, rugd_sample), SIZE)
    # in order, batches of 2: the second holds only the two corrupt frames (an empty batch)
    batches, skipped, seen = _epoch(frame_loader(data, 2, seed=0, workers=2, shuffle=False, drop_last=False))
    assert [len(b.indices) for b in batches] == [2, 0, 2] and [b.skipped for b in batches] == [0, 2, 0]
    assert skipped == 2 and seen == [0, 1, 4, 5]
    batches, skipped, seen = _epoch(frame_loader(data, 4, seed=1, workers=2, shuffle=True, drop_last=False))
    assert skipped == 2 and seen == [0, 1, 4, 5]  # every good frame exactly once
    for b in batches:
        for image, i in zip(b.images, b.indices.tolist()):
            ref = cv2.resize(data.frames[i].rgb(), SIZE[::-1], interpolation=cv2.INTER_AREA)
            assert torch.equal(torch.round(image * 255).to(torch.uint8).permute(1, 2, 0), torch.from_numpy(ref))


class _Stub:
    def __init__(self, name, rgb, label=None):
        self.name, self._rgb, self._label = name, rgb, label

    def rgb(self):
        if isinstance(self._rgb, Exception):
            raise self._rgb
        return self._rgb

    def label(self):
        return self._label


def test_wrong_shapes_and_failing_frames_are_skipped(rugd_sample, caplog):
    frame = open_dataset(rugd_sample)[0]
    rgb, label = frame.rgb(), frame.label()
    frames = [_Stub("ok", rgb, label), _Stub("grey", rgb[..., 0]), _Stub("float", rgb.astype(np.float32)),
              _Stub("label_size", rgb, label[:-1]), _Stub("raises", OSError("disk gone")), _Stub("ok2", rgb)]
    data = FrameDataset(frames, SIZE)
    with caplog.at_level(logging.WARNING, logger="ros_anomaly_diffusion"):
        batch = collate_frames([data[i] for i in range(len(data))])
    assert batch.skipped == 4 and batch.indices.tolist() == [0, 5]
    text = caplog.text
    assert all(n in text for n in ("(grey)", "(float)", "(label_size)", "(raises)", "disk gone"))
    with pytest.raises(IndexError):
        data[len(data)]


def test_infinite_loader_goes_on_reproducibly(rugd_sample):
    data = FrameDataset(list(open_dataset(rugd_sample))[:5], (32, 40))
    assert len(list(frame_loader(data, 2, seed=7))) == 2  # an epoch: 5 frames, whole batches of 2

    def draw(seed, n=10):
        it = iter(frame_loader(data, 2, seed=seed, infinite=True))
        return [next(it) for _ in range(n)]

    a, b, c = draw(7), draw(7), draw(8)
    idx = [i for batch in a for i in batch.indices.tolist()]
    assert len(idx) == 20 > len(data) and set(idx) <= set(range(5))
    assert idx == [i for batch in b for i in batch.indices.tolist()]
    assert all(torch.equal(x.images, y.images) for x, y in zip(a, b))
    assert idx != [i for batch in c for i in batch.indices.tolist()]


# --------------------------------------------------------------------------- bags


def _small_folder(tmp_path, rugd_sample, n=4):
    """n RUGD frames at 64x80 as PNG files; returns the folder and the RGB frames."""
    folder = tmp_path / "small"
    folder.mkdir()
    rgbs = []
    for i, f in enumerate(list(open_dataset(rugd_sample))[:n]):
        rgb = cv2.resize(f.rgb(), SIZE[::-1], interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(folder / f"f{i}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        rgbs.append(rgb)
    return folder, rgbs


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_bag_frames_read_each_message_lazily(tmp_path, rugd_sample, storage):
    folder, rgbs = _small_folder(tmp_path, rugd_sample)
    out = tmp_path / "drive"
    assert bag.folder_to_bag(folder, out, rate_hz=5.0, storage=storage) == 4
    frames = bag.bag_frames(out)
    assert [f.name for f in frames] == [f"drive_{i:06d}" for i in range(4)]
    assert [(f.bag, f.topic, f.timestamp, f.index, f.tie) for f in frames] == [
        (out.resolve(), "/camera/image", START + i * 200_000_000, i, 0) for i in range(4)]
    assert all(f.label() is None for f in frames)
    for f, ref in zip(reversed(frames), reversed(rgbs)):  # any order: random access
        np.testing.assert_array_equal(f.rgb(), ref)
    # the storage file alone is a bag too
    (single,) = out.glob("*.mcap" if storage == "mcap" else "*.db3")
    one = bag.bag_frames(single)
    assert [f.name for f in one] == [f"{single.stem}_{i:06d}" for i in range(4)]
    np.testing.assert_array_equal(one[2].rgb(), rgbs[2])
    # through worker processes (which open their own readers: this one has the bag open)
    batches, skipped, seen = _epoch(frame_loader(FrameDataset(frames, None), 2, seed=0, workers=2, shuffle=False))
    assert skipped == 0 and seen == [0, 1, 2, 3]
    got = torch.cat([b.images for b in batches])
    assert torch.equal(torch.round(got * 255).to(torch.uint8), torch.from_numpy(np.stack(rgbs)).permute(0, 3, 1, 2))
    assert torch.equal(torch.cat([b.weights for b in batches]), torch.ones(4, 1, *SIZE))


class _ReaderOf(torch.utils.data.Dataset):
    """(pid, id of the Reader this process reads `frame.bag` with) per frame."""

    def __init__(self, frames):
        self.frames = frames

    def __len__(self):
        return len(self.frames)

    def __getitem__(self, i):
        self.frames[i].rgb()
        return os.getpid(), id(bag.bag_reader(self.frames[i].bag))


def test_bag_readers_are_per_process_never_shared_across_fork(tmp_path, rugd_sample):
    folder, _ = _small_folder(tmp_path, rugd_sample)
    bag.folder_to_bag(folder, tmp_path / "b", storage="mcap")
    frames = bag.bag_frames(tmp_path / "b")
    ours = _ReaderOf(frames)
    (pid, reader), (_, again) = ours[0], ours[1]
    assert pid == os.getpid() and again == reader  # one reader per process and bag
    loader = torch.utils.data.DataLoader(ours, batch_size=None, num_workers=2, multiprocessing_context="fork")
    got = [(int(p), int(r)) for p, r in loader]
    # the parent's reader is still alive in every forked worker: a new one never gets its id
    assert {p for p, _ in got}.isdisjoint({pid}) and reader not in {r for _, r in got}
    # one reader per worker, for both of its frames (ids only compare within a process: two
    # workers forked from one parent may well allocate theirs at the same address)
    per_worker = {p: {r for q, r in got if q == p} for p, _ in got}
    assert len(got) == 4 and len(per_worker) == 2 and all(len(r) == 1 for r in per_worker.values())


def test_more_bags_than_open_readers(tmp_path, rugd_sample, monkeypatch):
    folder, rgbs = _small_folder(tmp_path, rugd_sample, n=2)
    bag.folder_to_bag(folder, tmp_path / "a", storage="mcap")
    bag.folder_to_bag(folder, tmp_path / "b", storage="sqlite3")
    a, b = bag.bag_frames(tmp_path / "a"), bag.bag_frames(tmp_path / "b")
    monkeypatch.setattr(bag, "MAX_OPEN_BAGS", 1)
    for _ in range(2):  # each read closes the other bag's reader and reopens its own
        for fa, fb, ref in zip(a, b, rgbs):
            np.testing.assert_array_equal(fa.rgb(), ref)
            np.testing.assert_array_equal(fb.rgb(), ref)
    kept = bag.bag_reader(b[0].bag)
    assert bag.bag_reader(b[0].bag) is kept  # the last bag read stays open and is reused
    bag.bag_reader(a[0].bag)  # opening another closes it: one open reader at most
    assert bag.bag_reader(b[0].bag) is not kept


def _bag(out, storage, messages):
    """A bag of (topic, "image" | "png", bag time, rgb, broken) messages: rgb8 Images or PNG
    CompressedImages; broken: "cdr" (serialised bytes cut in half), "data" (one row short)."""
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    store = get_typestore(Stores.ROS2_HUMBLE)
    Img, C, H, T = (store.types[t] for t in (bag.IMAGE_TYPE, bag.COMPRESSED_TYPE, "std_msgs/msg/Header",
                                             "builtin_interfaces/msg/Time"))
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    with Writer(out, version=8, storage_plugin=plugin) as writer:
        conns = {}
        for topic, kind, t, rgb, broken in messages:
            msgtype = bag.IMAGE_TYPE if kind == "image" else bag.COMPRESSED_TYPE
            if topic not in conns:
                conns[topic] = writer.add_connection(topic, msgtype, typestore=store)
            header = H(stamp=T(sec=t // 10**9, nanosec=t % 10**9), frame_id="cam")
            h, w = rgb.shape[:2]
            if kind == "image":
                data = rgb.reshape(-1)[: -w * 3 if broken == "data" else None]
                msg = Img(header=header, height=h, width=w, encoding="rgb8", is_bigendian=0, step=w * 3, data=data)
            else:
                png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].reshape(-1)
                msg = C(header=header, format="png", data=png)
            raw = store.serialize_cdr(msg, msgtype)
            writer.write(conns[topic], t, raw[: len(raw) // 2] if broken == "cdr" else raw)
    return out


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_bag_messages_at_the_same_bag_time_and_compressed_topics(tmp_path, rugd_sample, storage):
    _, rgbs = _small_folder(tmp_path, rugd_sample, n=3)
    s = 10**9
    out = _bag(tmp_path / "b", storage, [("/cam/image", "image", 10 * s, rgbs[0], None),
                                         ("/cam/image/compressed", "png", 10 * s, rgbs[2], None),
                                         ("/cam/image", "image", 10 * s, rgbs[1], None),
                                         ("/cam/image/compressed", "png", 11 * s, rgbs[1], None),
                                         ("/cam/image", "image", 11 * s, rgbs[2], None),
                                         ("/cam/image/compressed", "png", 11 * s, rgbs[0], None)])
    with pytest.raises(ValueError, match="several image topics"):
        bag.bag_frames(out)
    for topic, order in (("cam/image", (0, 1, 2)), ("/cam/image/compressed", (2, 1, 0))):
        frames = bag.bag_frames(out, topic)
        assert [(f.timestamp, f.tie) for f in frames] == [(10 * s, 0), (10 * s, 1), (11 * s, 0)] if \
            topic == "cam/image" else [(10 * s, 0), (11 * s, 0), (11 * s, 1)]
        for f, k in zip(frames, order):
            np.testing.assert_array_equal(f.rgb(), rgbs[k])


@pytest.mark.parametrize("storage, how", [("mcap", "cdr"), ("mcap", "data"), ("sqlite3", "data")])
def test_an_undecodable_bag_message_is_a_skipped_sample(tmp_path, rugd_sample, storage, how, caplog):
    _, rgbs = _small_folder(tmp_path, rugd_sample, n=3)
    out = _bag(tmp_path / "bad", storage, [("/cam", "image", START + i, rgb, how if i == 1 else None)
                                           for i, rgb in enumerate(rgbs)])
    frames = bag.bag_frames(out)
    assert len(frames) == 3  # indexing decodes nothing
    with pytest.raises(ValueError, match="undecodable message 1"):
        frames[1].rgb()
    data = FrameDataset(frames, (16, 20))
    with caplog.at_level(logging.WARNING, logger="ros_anomaly_diffusion"):
        batch = collate_frames([data[i] for i in range(3)])
    assert batch.skipped == 1 and batch.indices.tolist() == [0, 2]
    assert "bad_000001" in caplog.text and "undecodable message 1" in caplog.text
