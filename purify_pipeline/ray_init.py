"""Ray for the jobs (CLI, demo): connect to a cluster at an address, else start a local Ray sized for the machine.

    init_ray()                      # local Ray, at least 4 logical CPUs, no dashboard
    init_ray("head:6379")           # an existing cluster (reachability checked first: fails in seconds)

Ray's own INFO/WARNING lines (Ray Data's progress logs on a non-terminal stdout, start-up notices) are hidden,
since the jobs print their own progress bars, and so are the benign lines Ray's C++ core worker and its
internal actors write straight to the driver's stderr (`StderrFilter`); ``DEBUG = True`` (the CLI's
``--debug``) keeps everything.
"""
from __future__ import annotations

import logging
import os
import re
import select
import socket
import sys
import threading

__all__ = ["DEBUG", "RayConnectError", "StderrFilter", "init_ray", "quiet_ray_logs", "shutdown_started_ray"]

DEBUG = False
_STARTED = False  # shut down at exit only a Ray this process started
_RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.data._internal.progress.logging_progress",
                "ray.data._internal.execution.streaming_executor")  # fmt: skip


# Lines a successful run prints that are not the user's business: the core worker's warning about any actor pool that
# Ray may restart (Ray Data passes every map actor its constructor through the object store), and Ray Train's
# placement-group cleaner asking for a controller that has already finished.
BENIGN = re.compile(rb"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store"
                    rb"|Failed to query Ray Train Controller actor state")  # fmt: skip


class StderrFilter:
    """Drop `BENIGN` lines from everything written to this process's file descriptor 2 (Python and C++ alike).

    fd 2 becomes a pipe; a thread forwards what arrives to the real stderr segment by segment (a segment ends at
    "\n" or "\r", so progress bars still redraw in place; an unterminated one is forwarded after 50 ms idle)
    and leaves out the segments matching `pattern`. `close()` restores fd 2 and forwards what is left."""

    def __init__(self, pattern: re.Pattern[bytes] = BENIGN) -> None:
        self.pattern = pattern
        sys.stderr.flush()
        self._real = os.dup(2)
        self._r, w = os.pipe()
        self._w = os.dup(w)  # kept to send the end-of-stream mark: Ray's processes may hold fd 2 open too
        os.dup2(w, 2)
        os.close(w)
        self._done = b"\x00purify-pipeline-stderr-end\x00"
        self._thread = threading.Thread(target=self._pump, name="stderr-filter", daemon=True)
        self._thread.start()

    def _forward(self, seg: bytes) -> None:
        if seg and not self.pattern.search(seg):
            os.write(self._real, seg)

    def _pump(self) -> None:
        buf = b""
        while True:
            ready = select.select([self._r], [], [], 0.05)[0]
            if ready:
                chunk = os.read(self._r, 65536)
                if not chunk:
                    break
                buf += chunk
                if self._done in buf:
                    buf = buf.replace(self._done, b"")
                    break
            *complete, buf = re.split(rb"(?<=[\r\n])", buf)
            for seg in complete:
                self._forward(seg)
            if buf and not ready:  # idle: an unterminated segment (a progress bar being drawn) goes out now
                self._forward(buf)
                buf = b""
        for seg in re.split(rb"(?<=[\r\n])", buf):
            self._forward(seg)

    def close(self) -> None:
        sys.stderr.flush()
        os.dup2(self._real, 2)
        os.write(self._w, self._done)
        self._thread.join(timeout=5)
        os.close(self._w)
        if not self._thread.is_alive():
            os.close(self._r)
            os.close(self._real)


_FILTER: StderrFilter | None = None


class RayConnectError(ConnectionError):
    """No Ray could be reached or started (one line, naming the address)."""


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast (a socket connect) instead of letting ray.init retry an address nobody listens on."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise RayConnectError(f"Ray address {address!r} is not host:port (or 'auto', or ray://host:port)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise RayConnectError(f"cannot reach a Ray cluster at {address}: {e.strerror or e}") from None


def init_ray(address: str | None = None, *, num_cpus: int | None = None, log_to_driver: bool | None = None) -> None:
    """Connect to the Ray cluster at `address` (checked for reachability first), else start a local Ray.

    Local Ray gets at least 4 logical CPUs (oversubscribing a 2-core machine is fine; fewer slots make
    actor pools starve Ray Data's read tasks) and no dashboard. No-op when Ray is already initialised."""
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    import ray

    global _STARTED
    if ray.is_initialized():
        return
    from purify_pipeline._progress import progress_enabled

    quiet = not progress_enabled() if log_to_driver is None else not log_to_driver
    if address and address != "auto":
        _check_reachable(address)
    level = "WARNING" if DEBUG else "ERROR"
    try:
        if address:
            ray.init(address=address, log_to_driver=not quiet, logging_level=level)
        else:
            ray.init(num_cpus=num_cpus or max(4, os.cpu_count() or 1), include_dashboard=False,
                     log_to_driver=not quiet, configure_logging=True, logging_level=level)  # fmt: skip
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise RayConnectError(f"cannot connect to Ray at {address or 'a new local instance'}: {_first_line(e)}") from None
    _STARTED = True
    quiet_ray_logs()
    global _FILTER
    if not DEBUG and _FILTER is None:  # after ray.init: Ray's own processes keep the real stderr
        _FILTER = StderrFilter()


def quiet_ray_logs() -> None:
    """Set Ray's loggers to ERROR (DEBUG when ``DEBUG``): after importing ray.data, which configures them."""
    import ray.data  # noqa: F401

    for name in _RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if DEBUG else logging.ERROR)


def shutdown_started_ray() -> None:
    """Shut down the local Ray that `init_ray` started in this process, if any (never a cluster's)."""
    global _STARTED, _FILTER
    if _STARTED:
        import ray

        ray.shutdown()
        _STARTED = False
    if _FILTER is not None:
        _FILTER.close()
        _FILTER = None
