"""Bounded reads of Ray's GCS tables: a slow GCS must not freeze the coordinator.

The coordinator is one actor that every tenant calls, one call at a time. It reads Ray's node
table (`ray.nodes()`: the nodes to plan on, the dead nodes behind a node loss) and its job table
(tenant liveness) inside those calls, and Ray's reads have no timeout: with the GCS slow or
restarting, one read would hold every tenant's call behind it. `bounded_read` runs a read in a
daemon thread and gives up after `READ_TIMEOUT_S` (`GcsReadTimeout`); callers count that as
"unknown": the nodes planned on stay as they were, every tenant counts as alive. While a read of
a table is still stuck, the next read of that table gives up at once rather than stack threads.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, TypeVar

logger = logging.getLogger(__name__)

READ_TIMEOUT_S = 5.0
NODES = "node"                   # ray.nodes()
JOBS = "job"                     # ray._private.state.jobs()

T = TypeVar("T")
_stuck: dict[str, threading.Thread] = {}     # table -> the read that timed out, while it still waits
_lock = threading.Lock()


class GcsReadTimeout(TimeoutError):
    """Ray's GCS did not answer a table read in time: the caller treats the table as unknown."""


def bounded_read(table: str, read: Callable[[], T], timeout_s: float = READ_TIMEOUT_S) -> T:
    """`read()` (a read of Ray's `table` table), or GcsReadTimeout once it takes `timeout_s`,
    or at once while an earlier read of `table` that timed out still waits. Its errors are
    raised as they are."""
    with _lock:
        earlier = _stuck.get(table)
        if earlier is not None and earlier.is_alive():
            raise GcsReadTimeout(f"an earlier read of Ray's {table} table still waits for the GCS")
        _stuck.pop(table, None)
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = read()
        except BaseException as err:  # noqa: BLE001 - raised in the caller's thread
            out["error"] = err

    thread = threading.Thread(target=run, name=f"alto-gcs-{table}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        with _lock:
            _stuck[table] = thread
        logger.warning("alto: Ray's %s table did not answer within %gs: treated as unknown until it does",
                       table, timeout_s)
        raise GcsReadTimeout(f"Ray's {table} table did not answer within {timeout_s:g}s")
    if "error" in out:
        raise out["error"]
    return out["value"]
