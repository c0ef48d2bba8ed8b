"""``LoopThread.close`` (rpc/loop_thread.py) leaves nothing pending: tasks still running when it
is called end first, and an asynchronous generator dropped at a ``yield`` by such a task (as
grpc.aio drops a streaming handler interrupted mid-write) is closed, its ``finally`` run."""

from __future__ import annotations

import asyncio
import gc
import threading

import pytest

from expertplane.rpc.loop_thread import LoopThread

pytestmark = pytest.mark.timeout(30)


def test_close_lets_running_tasks_end_and_closes_dropped_generators():
    loop_thread = LoopThread("test-loop")
    problems, cleaned = [], threading.Event()
    loop_thread.loop.set_exception_handler(lambda _loop, context: problems.append(context))

    async def handler():
        try:
            yield "ack"
            yield "never reached"
        finally:
            cleaned.set()

    async def call():
        """Takes the handler's first response, then drops it there a little later."""
        responses = handler()
        await responses.__anext__()
        await asyncio.sleep(0.05)

    async def begin_call() -> asyncio.Task:
        return asyncio.get_running_loop().create_task(call())

    loop_thread.start()
    task = loop_thread.run(begin_call())
    loop_thread.close()                       # the call is still running
    gc.collect()
    assert task.done() and not task.cancelled()
    assert cleaned.is_set()
    assert [ctx["message"] for ctx in problems] == []
    assert loop_thread.loop.is_closed()


def test_close_cancels_a_task_that_does_not_end():
    loop_thread = LoopThread("test-loop")
    loop_thread.start()

    async def begin() -> asyncio.Task:
        return asyncio.get_running_loop().create_task(asyncio.Event().wait(), name="stuck")

    task = loop_thread.run(begin())
    loop_thread.close(timeout=0.1)
    assert task.cancelled() and loop_thread.loop.is_closed()
