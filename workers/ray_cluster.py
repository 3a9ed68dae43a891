"""Joining a Ray cluster, or starting one for this run alone, and leaving it.

Every command that runs on Ray (a round, a multi-worker training) connects through
``ensure_ray``; the command line's signal handling stops the Ray it started (``stop_ray``).
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time

import ray

# How long ``--address`` may take to answer: Ray itself retries an address where nothing
# listens for minutes, printing a warning every few seconds.
CONNECT_SECONDS = 15.0

_STARTED = False  # whether ensure_ray connected this process (not a caller's own ray.init)


def started_ray() -> bool:
    return _STARTED and ray.is_initialized()


def stop_ray() -> None:
    """Disconnect, and stop the local Ray ``ensure_ray`` started, with its workers."""
    global _STARTED
    ray.shutdown()
    _STARTED = False


class ClusterUnreachable(ValueError):
    """``--address`` names no Ray cluster that answers: nothing was run."""


def ensure_ray(address: str | None) -> None:
    """Join ``address`` (``auto``: the cluster ``ray start`` made here) or start a private one.

    Without ``--address`` Ray is started for this run alone ("local"): a plain ``ray.init()``
    would quietly join whatever cluster ``ray start`` last left on the machine. A SIGTERM
    handler the caller set (the command line's) is kept: ``ray.init`` replaces it with its own.
    """
    global _STARTED
    if ray.is_initialized():
        return
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if main else None
    try:
        if address:
            wait_for_cluster(address)
            try:
                ray.init(address=address, logging_level=logging.WARNING, configure_logging=False)
            except ConnectionError as exc:
                raise ClusterUnreachable(f"--address {address}: {exc}") from exc
        else:
            ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING,
                     configure_logging=False)
        _STARTED = True
    finally:
        if callable(handler):
            signal.signal(signal.SIGTERM, handler)


def wait_for_cluster(address: str, seconds: float = CONNECT_SECONDS) -> None:
    """Return once something listens at ``address``; give up after ``seconds``, clearly."""
    endpoint = cluster_endpoint(address)
    if endpoint is None:
        return  # "auto" with no cluster recorded: ray.init says so at once
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(endpoint, timeout=min(2.0, seconds)).close()
            return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise ClusterUnreachable(
                    f"--address {address}: no Ray cluster answered at "
                    f"{endpoint[0]}:{endpoint[1]} within {seconds:.0f} s "
                    f"({exc.strerror or exc}); start one there with `ray start --head`, or "
                    "leave --address out to run on this machine alone") from exc
        time.sleep(0.5)


def cluster_endpoint(address: str) -> tuple[str, int] | None:
    """(host, port) that ``address`` names: HOST:PORT, ray://HOST[:PORT], or ``auto`` (the
    cluster ``ray start`` recorded on this machine; None when there is none)."""
    if address.startswith("ray://"):
        hostport = address[len("ray://"):].split("/")[0]
        if not hostport.rpartition(":")[2].isdigit():
            hostport += ":10001"  # Ray Client's default port
    elif address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        hostport = canonicalize_bootstrap_address("auto")
        if hostport is None:
            return None
    else:
        hostport = address
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterUnreachable(f"--address {address}: use HOST:PORT, ray://HOST:PORT or auto")
    return host.strip("[]"), int(port)
