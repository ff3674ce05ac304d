"""A micro-batcher per model: concurrent requests are gathered (bounded queue, max wait in ms) and encoded
together on one worker thread, so throughput grows with load and a model is never run concurrently."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Sequence
from typing import Any

from service.errors import ApiError


class MicroBatcher:
    def __init__(self, fn: Callable[[list[Any]], Sequence[Any]], max_batch: int = 32, max_wait_ms: float = 5.0,
                 max_queue: int = 1024, name: str = "model"):
        self.fn, self.max_batch, self.max_wait = fn, max_batch, max_wait_ms / 1000.0
        self.max_queue, self.name = max_queue, name
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batch-{name}")
        self._queue: asyncio.Queue[tuple[Any, asyncio.Future[Any]]] | None = None
        self._task: asyncio.Task[None] | None = None
        self.batches_run = 0
        self.items_run = 0

    def _ensure_started(self) -> asyncio.Queue[tuple[Any, asyncio.Future[Any]]]:
        loop = asyncio.get_running_loop()
        if self._queue is None or self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._queue = asyncio.Queue()
            self._task = loop.create_task(self._run())
        return self._queue

    async def submit_many(self, items: Sequence[Any]) -> list[Any]:
        """Queue several inputs (one request's) and wait for all their outputs, in order."""
        queue = self._ensure_started()
        if queue.qsize() + len(items) > self.max_queue:
            raise ApiError(503, "overloaded", f"the {self.name} queue is full; retry shortly")
        loop = asyncio.get_running_loop()
        futures = []
        for item in items:
            future: asyncio.Future[Any] = loop.create_future()
            queue.put_nowait((item, future))
            futures.append(future)
        return list(await asyncio.gather(*futures))

    async def _run(self) -> None:
        assert self._queue is not None
        queue = self._queue
        loop = asyncio.get_running_loop()
        while True:
            first = await queue.get()
            batch = [first]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), timeout))
                except TimeoutError:
                    break
            inputs = [item for item, _ in batch]
            try:
                outputs = await loop.run_in_executor(self._executor, self.fn, inputs)
                self.batches_run += 1
                self.items_run += len(inputs)
                for (_, future), output in zip(batch, outputs, strict=True):
                    if not future.done():
                        future.set_result(output)
            except Exception as exc:  # noqa: BLE001 - delivered to every waiting request
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)

    def run_sync(self, items: list[Any]) -> list[Any]:
        """Encode outside the event loop (CLI, start-up warm-up), on the same worker thread."""
        return list(self.call_on_worker(self.fn, items).result())

    def call_on_worker(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        """Run another call of the same model on its worker thread, so it never overlaps the batches."""
        return self._executor.submit(fn, *args)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
