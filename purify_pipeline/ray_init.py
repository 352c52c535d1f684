"""Ray for the jobs (CLI, demo): connect to a cluster at an address, else start a local Ray sized for the machine.

    init_ray()                      # local Ray, at least 4 logical CPUs, no dashboard
    init_ray("head:6379")           # an existing cluster (reachability checked first: fails in seconds)

Ray's own INFO/WARNING lines (Ray Data's progress logs on a non-terminal stdout, start-up notices) are hidden,
since the jobs print their own progress bars; ``DEBUG = True`` (the CLI's ``--debug``) keeps them.
"""
from __future__ import annotations

import logging
import os
import socket

__all__ = ["DEBUG", "RayConnectError", "init_ray", "quiet_ray_logs", "shutdown_started_ray"]

DEBUG = False
_STARTED = False  # shut down at exit only a Ray this process started
_RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.data._internal.progress.logging_progress",
                "ray.data._internal.execution.streaming_executor")  # fmt: skip


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
    from ._progress import progress_enabled

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


def quiet_ray_logs() -> None:
    """Set Ray's loggers to ERROR (DEBUG when ``DEBUG``): after importing ray.data, which configures them."""
    import ray.data  # noqa: F401

    for name in _RAY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if DEBUG else logging.ERROR)


def shutdown_started_ray() -> None:
    """Shut down the local Ray that `init_ray` started in this process, if any (never a cluster's)."""
    global _STARTED
    if _STARTED:
        import ray

        ray.shutdown()
        _STARTED = False
