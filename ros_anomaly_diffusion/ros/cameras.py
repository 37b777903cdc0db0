"""Camera topics -> the namespaces their detector outputs go to (one rule for the multi-camera
launch file and the multi-camera node): /front/image_raw -> front, /robot/left/image_rect ->
robot/left, /image_raw -> image_raw. Plain Python: launch files import it."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Camera:
    """One camera the detector node serves: its image topic, where its outputs go, its
    CameraInfo topic, and (while configured) its output publishers and AnomalyPoints."""
    topic: str  # resolved image topic
    prefix: str  # outputs are <prefix>/<name>: "anomaly" (single camera) or /<camera namespace>/anomaly
    info_topic: str
    outputs: dict[str, Any] = field(default_factory=dict)
    points: Any = None


def camera_namespaces(cameras: str) -> list[tuple[str, str]]:
    """'topic,topic,...' -> [(absolute topic, namespace)]; RuntimeError for an empty list, a
    name that is not a topic, or two cameras in one namespace (their outputs would mix)."""
    pairs = []
    for topic in (t.strip() for t in cameras.split(',')):
        if not topic:
            continue
        parts = [p for p in topic.split('/') if p]
        if not parts or any(not re.fullmatch(r'[A-Za-z_][A-Za-z0-9_]*', p) for p in parts):
            raise RuntimeError('cameras: %r is not a valid topic name' % topic)
        namespace = '/'.join(parts[:-1]) if len(parts) > 1 else parts[0]
        pairs.append(('/' + '/'.join(parts), namespace))
    if not pairs:
        raise RuntimeError('cameras is empty: give one or more image topics, e.g. '
                           'cameras:=/front/image_raw,/rear/image_raw')
    seen = {}
    for topic, namespace in pairs:
        if namespace in seen:
            raise RuntimeError('cameras %s and %s would both run in namespace /%s; give topics in '
                               'different camera namespaces' % (seen[namespace], topic, namespace))
        seen[namespace] = topic
    return pairs


def info_beside(image_topic: str) -> str:
    """The CameraInfo topic beside an image topic (image_pipeline's rule): /cam/image_raw -> /cam/camera_info."""
    return image_topic.rsplit('/', 1)[0] + '/camera_info'


def node_cameras(params: dict, resolve) -> list[tuple[str, str, str]]:
    """The detector node's cameras, [(image topic, output prefix, CameraInfo topic)], from its
    parameters `cameras`, `camera_info_topic` and `depth_topic` (`resolve`: the node's
    resolve_topic_name): its `image` input with outputs under `anomaly`, or one camera per
    `cameras` topic with outputs under /<camera namespace>/anomaly. ValueError for a
    single-camera option given with several cameras."""
    if not params['cameras']:
        topic, info = resolve('image'), params['camera_info_topic']
        return [(topic, 'anomaly', resolve(info) if info else info_beside(topic))]
    if params['camera_info_topic'] or params['depth_topic']:
        raise ValueError('camera_info_topic and depth_topic are for a single camera; with cameras, each '
                         "camera's CameraInfo is read beside its image topic and points use the ground plane")
    return [(topic, f'/{ns}/anomaly', info_beside(topic)) for topic, ns in camera_namespaces(params['cameras'])]
