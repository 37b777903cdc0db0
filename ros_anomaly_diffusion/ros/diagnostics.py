"""diagnostic_msgs messages of the detector node: /diagnostics (the runtime's statistics window,
the model that runs, anomaly points) and anomaly/ood_stamped (the filtered flag with the input
frame's header, since std_msgs has no stamped Bool)."""
from __future__ import annotations

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

from ..core.stream_stats import Health

LEVELS = {"ok": DiagnosticStatus.OK, "warn": DiagnosticStatus.WARN, "error": DiagnosticStatus.ERROR}


def status_array(name: str, health: Health, values: dict[str, str], hardware_id: str = "",
                 header=None) -> DiagnosticArray:
    """One DiagnosticStatus in a DiagnosticArray (`header`: the array's, e.g. an input frame's)."""
    status = DiagnosticStatus(level=LEVELS[health.level], name=name, message=health.message,
                              hardware_id=hardware_id, values=[KeyValue(key=k, value=v) for k, v in values.items()])
    return DiagnosticArray(status=[status]) if header is None else DiagnosticArray(header=header, status=[status])


def ood_stamped(node_name: str, header, result, det) -> DiagnosticArray:
    """anomaly/ood_stamped: WARN + "ood" while the filtered flag is raised, OK + "id" otherwise."""
    flag = bool(result.ood_filtered)
    values = {"frame_score": f"{result.frame_score:.6f}", "frame_ood": str(bool(result.is_ood)).lower(),
              "frame_threshold": f"{det.frame_threshold:.6f}", "mask_threshold": f"{det.mask_threshold:.6f}",
              "anomalous_fraction": f"{float(result.mask.mean()):.6f}"}
    health = Health("warn", "ood") if flag else Health("ok", "id")
    return status_array(f"{node_name}: ood", health, values, header.frame_id, header)


def node_health(state: str, problem: str) -> Health:
    """A node that is not active: OK with its lifecycle state, ERROR with why configure failed."""
    return Health("error", f"{state}: configure failed: {problem}") if problem else Health("ok", state)
