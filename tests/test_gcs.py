"""`gcs.bounded_read`: a read of Ray's GCS that hangs gives up in time. No Ray: plain functions
that block stand in for a GCS that does not answer."""

from __future__ import annotations

import threading
import time

import pytest

from alto_ray.cluster.gcs import GcsReadTimeout, bounded_read


def test_a_read_answers_or_raises_as_it_would_unbounded() -> None:
    assert bounded_read("answers", lambda: [1, 2]) == [1, 2]
    with pytest.raises(KeyError, match="gone"):
        bounded_read("fails", lambda: {}["gone"])


def test_a_read_that_blocks_gives_up_in_time_and_the_next_one_at_once_until_it_returns() -> None:
    release, calls = threading.Event(), []

    def blocks() -> list[str]:
        calls.append("blocks")
        release.wait(30)
        return ["late"]

    t0 = time.monotonic()
    with pytest.raises(GcsReadTimeout, match="did not answer within 0.3s"):
        bounded_read("slow", blocks, timeout_s=0.3)
    assert 0.3 <= time.monotonic() - t0 < 2.0

    t0 = time.monotonic()                             # the first read still waits: no second thread
    with pytest.raises(GcsReadTimeout, match="still waits"):
        bounded_read("slow", lambda: calls.append("second") or ["x"], timeout_s=10)
    assert time.monotonic() - t0 < 0.5 and calls == ["blocks"]
    assert bounded_read("other", lambda: ["fine"]) == ["fine"]   # another table is not held up

    release.set()                                     # the GCS answers again: reads work again
    deadline = time.monotonic() + 10
    while True:
        try:
            assert bounded_read("slow", lambda: ["back"], timeout_s=1) == ["back"]
            break
        except GcsReadTimeout:
            assert time.monotonic() < deadline
            time.sleep(0.05)
