"""Work shared by a few threads of wsfold's own (CRCs and file writes, digests: calls that let go of the GIL),
safe against a stop signal arriving at any moment.

concurrent.futures is not used: a signal handler that raises (Ctrl-C, and the CLI's SIGTERM/SIGHUP) can do so
in the main thread just after a Python-level lock of the executor was taken and before the code that releases it
runs; the workers then wait on that lock forever, and so does the interpreter's exit. Here the main thread only
starts the threads (with stop signals held) and waits for them; the workers' own lock is never the main thread's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from .paths import signals_held

T = TypeVar("T")
R = TypeVar("R")


def each_in_threads(
    work: Callable[[T], R], items: Sequence[T], *, threads: int = 2, stop: threading.Event | None = None, name: str
) -> list[R]:
    """``work(item)`` for every item, on up to ``threads`` threads taking the items in order; the results in the
    items' order. The first exception of a worker sets ``stop`` (work that takes long should check it between
    its steps), the other workers take no further item, and it is raised here once they have all ended. So does
    an interruption of the waiting thread: every worker has ended before the exception goes on, so nothing they
    use (an open file) is released under them."""
    stop = stop if stop is not None else threading.Event()
    results: list = [None] * len(items)
    errors: list[BaseException] = []
    lock = threading.Lock()
    order = iter(range(len(items)))
    count = max(1, min(threads, len(items)))
    ended = [False] * count  # written by each worker as it ends; the waiting thread only reads it

    def run(k: int) -> None:
        try:
            while not stop.is_set():
                with lock:
                    i = next(order, None)
                if i is None:
                    return
                try:
                    results[i] = work(items[i])
                except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                    errors.append(exc)
                    stop.set()
                    return
        finally:
            ended[k] = True

    workers = [threading.Thread(target=run, args=(k,), name=name, daemon=True) for k in range(count)]
    with signals_held():  # an exception inside Thread.start can leave its lock taken for good
        for worker in workers:
            worker.start()
    try:
        _until_all(ended)
    finally:
        stop.set()
        _until_all(ended, through_interruptions=True)
    for worker in workers:
        worker.join()  # each has ended its work: this returns at once
    if errors:
        raise errors[0]
    return results


def _until_all(ended: list[bool], through_interruptions: bool = False) -> None:
    """Wait until every flag is set, by short sleeps: the waiting thread holds no lock a worker needs, and
    Thread.join is not used for this (interrupted, Python 3.11's marks a running thread as ended). With
    ``through_interruptions``, further interruptions are waited through and the first is raised afterwards."""
    interrupted = None
    while not all(ended):
        try:
            time.sleep(0.005)
        except BaseException as exc:  # noqa: BLE001 - re-raised once every worker has ended
            if not through_interruptions:
                raise
            interrupted = interrupted or exc
    if interrupted is not None:
        raise interrupted
