"""Camera topics -> the namespaces their detector outputs go to (one rule for the multi-camera
launch file and the multi-camera node): /front/image_raw -> front, /robot/left/image_rect ->
robot/left, /image_raw -> image_raw. Plain Python: launch files import it."""
from __future__ import annotations

import re


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
