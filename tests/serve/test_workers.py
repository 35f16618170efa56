"""The served model's work queue: one model thread, image work one request per core, deadlines."""

from __future__ import annotations

import threading
import time

import pytest

from medlens.runtime import available_cores
from medlens.serve.service import Workers
from medlens.serve.uploads import RequestError


def test_model_calls_run_one_at_a_time_on_one_thread():
    workers = Workers("test-model", request_seconds=10)
    seen: set[str] = set()

    def call(i: int) -> int:
        seen.add(threading.current_thread().name)
        return i * i

    results: list[int] = []

    def request(i: int) -> None:
        results.append(workers.model(workers.deadline(), call, i))

    threads = [threading.Thread(target=request, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    workers.close()
    assert sorted(results) == [i * i for i in range(6)]
    assert len(seen) == 1 and next(iter(seen)).startswith("test-model")


def test_image_work_is_bounded_by_the_cores():
    workers = Workers("test-image", request_seconds=10)
    cores = available_cores()
    lock, inside, peak = threading.Lock(), [0], [0]

    def request() -> None:
        with workers.image_work(workers.deadline()):
            with lock:
                inside[0] += 1
                peak[0] = max(peak[0], inside[0])
            time.sleep(0.05)
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=request) for _ in range(3 * cores + 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    workers.close()
    assert peak[0] == cores


def test_a_late_request_gets_503_and_its_queued_call_never_runs():
    workers = Workers("test-late", request_seconds=0.2)
    ran: list[str] = []
    busy = workers._model.submit(time.sleep, 0.6)
    with pytest.raises(RequestError) as caught:
        workers.model(workers.deadline(), ran.append, "late")
    assert (caught.value.status, caught.value.code) == (503, "request_timeout")
    busy.result()
    time.sleep(0.05)
    assert ran == []  # cancelled while still queued
    assert workers.model(workers.deadline(), len, "ok") == 2
    workers.close()
