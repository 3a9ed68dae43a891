"""How a command ends: SIGINT and SIGTERM as one line and the shell's code, and the errors that
are the user's to fix as one line and an exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import signal
import sys
import threading


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM reached the command: it ends with one line, not a traceback."""


# What a stopped command keeps, and how to go on.
STOPPED = {
    "run": "shards committed so far are kept; run the same command again to finish the round",
    "bootstrap": "finished steps are kept; run the same command again to go on from them",
    "pretrain": "checkpoints are kept; run the same command again to resume from the last",
    "finetune": "checkpoints are kept; run the same command again to resume from the last",
}


# The signal last received: Ray's blocking calls turn any exception a handler raises while
# they wait into a plain KeyboardInterrupt, which no longer says which signal it was.
RECEIVED: list[int] = []


def _stop(signum: int, frame) -> None:
    RECEIVED.append(signum)
    raise Stopped(signal.Signals(signum).name)


def catch_signals() -> dict:
    """Route SIGINT and SIGTERM to ``Stopped`` (one left ignored, by nohup say, stays ignored);
    returns the handlers to put back."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum, handler in before.items():
        if handler in (signal.SIG_DFL, signal.default_int_handler):
            signal.signal(signum, _stop)
    return before


def stopped(command: str, signum: int) -> int:
    """Shut down the Ray this command started (its workers with it), say so, and return the
    shell's code for death by ``signum`` (130 for SIGINT, 143 for SIGTERM)."""
    from capfilt.terminal import terminal_safe

    for other in (signal.SIGINT, signal.SIGTERM):  # a second signal must not interrupt this
        signal.signal(other, signal.SIG_IGN)
    cluster = sys.modules.get("workers.ray_cluster")
    if cluster is not None and cluster.started_ray():
        cluster.stop_ray()
    what = STOPPED.get(command, "run the same command again")
    print(terminal_safe(f"capfilt: stopped by {signal.Signals(signum).name}: {what}"),
          file=sys.stderr)
    return 128 + signum


def no_space_line(exc: OSError, args: argparse.Namespace) -> str:
    """One line for a disk that filled up mid-command: the folder, and what to do."""
    if exc.strerror and exc.strerror.startswith("no space left on device in "):
        return exc.strerror  # the dispatcher's own account (pipelines.dispatch.DiskFullError)
    folder = getattr(args, "output", None) or exc.filename or "the output folder"
    return (f"no space left on device writing {folder}; free some space there and run the "
            "same command again (what was finished is kept)")


def run_command(command, args: argparse.Namespace) -> int:
    """The exit code of ``command(args)``; errors that are the user's to fix print one line."""
    from capfilt.terminal import terminal_safe
    from manifests import ManifestError

    try:
        return command(args)
    except (ManifestError, ValueError) as exc:  # PlanError, ModelSourceError: ValueErrors
        print(terminal_safe(f"capfilt: error: {exc}"), file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        print(terminal_safe(f"capfilt: error: {no_space_line(exc, args)}"), file=sys.stderr)
        return 1
    except RuntimeError as exc:
        # Looked up, not imported: the worker pool loads Ray, which commands that only read
        # files (validate, report, lineage) should not wait for; and only a loaded pool raises
        # its WorkerStartError.
        pool = sys.modules.get("workers.worker_pool")
        if pool is None or not isinstance(exc, pool.WorkerStartError):
            raise
        print(terminal_safe(f"capfilt: error: {exc}"), file=sys.stderr)
        return 3
