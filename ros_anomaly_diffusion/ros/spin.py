"""How the package's node processes start and end (detector_node, replay_node): DDS settings for
camera-sized frames, rclpy, the package's Python logging in the node's ROS log, spinning until
the node is done, a fatal error as one log line and exit code 1, Ctrl-C as a clean exit."""
from __future__ import annotations

import logging
from collections.abc import Callable

import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node

from . import transport


class _RosLogHandler(logging.Handler):
    """Python logging of the package (core warnings: CUDA fallback, ...) into a node's ROS log."""

    def __init__(self, logger):
        super().__init__(logging.INFO)
        self._logger = logger

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.levelno >= logging.ERROR:
                self._logger.error(text)
            elif record.levelno >= logging.WARNING:
                self._logger.warning(text)
            else:
                self._logger.info(text)
        except Exception:  # logging must never take the node down
            self.handleError(record)


def bridge_python_logging(node: Node) -> logging.Handler:
    """Route the package's Python log records (INFO and up) to `node`'s ROS logger."""
    pkg = logging.getLogger(__name__.split(".")[0])
    handler = _RosLogHandler(node.get_logger())
    pkg.addHandler(handler)
    pkg.setLevel(logging.INFO)
    pkg.propagate = False
    return handler


def run_node(name: str, make: Callable[[], Node], done: Callable[[Node], bool], *,
             fatal: tuple[type[BaseException], ...] = (), start: Callable[[Node], None] | None = None,
             finish: Callable[[Node], int] | None = None, close: Callable[[Node], None] | None = None,
             args: list[str] | None = None, period_s: float = 0.1) -> int:
    """Run one node in this process; its exit code. `make` builds the node, `start` (optional)
    starts it, the executor spins until `done(node)`, `finish` (optional) gives the exit code.
    An exception of `fatal` is logged as one fatal line (exit code 1); `close` (default:
    destroy_node) runs whatever happened, then rclpy shuts down."""
    dds = transport.apply_large_frame_defaults()
    rclpy.init(args=args)
    node, code = None, 0
    try:
        node = make()
        node.get_logger().info(transport.describe(dds))
        bridge_python_logging(node)
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        if start is not None:
            start(node)
        while rclpy.ok() and not done(node):
            executor.spin_once(timeout_sec=period_s)
        code = finish(node) if finish is not None else 0
    except fatal as err:
        (node.get_logger() if node else rclpy.logging.get_logger(name)).fatal(str(err))
        code = 1
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            (close or Node.destroy_node)(node)
        rclpy.try_shutdown()
    return code
