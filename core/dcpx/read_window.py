"""The order in which a load asks the planner for tensors and gives them back.

Stock torch's reader calls ``resolve_tensor``, fills the tensor and calls ``commit_tensor``,
one item at a time.  dcpx fills several tensors at once on item threads, and keeps to what a
planner may rely on:

- items are resolved and committed in plan order, and resolved ahead of the last commit
  only while the tensors in flight stay within a budget (``threads`` of them always, more
  up to ``max_bytes`` and ``16 * threads``), so a planner that gives each item new memory
  (staging copies for GPU or meta-device destinations) holds a bounded amount;
- a tensor whose memory overlaps one still being filled (a staging buffer the planner reuses
  for every item, tied weights) waits until that one is committed;
- non-tensor entries are decoded on the calling thread when they are next in plan order, so
  decoded entries never pile up while the planner unpickles earlier ones.
"""

from __future__ import annotations

import bisect
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, NamedTuple

import torch
from torch.distributed.checkpoint.planner import LoadPlanner
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .read_job import ReadJob

# (device, first byte, end) of a tensor's memory; None where it cannot be known
Span = tuple[str, int, int] | None


class _Pending(NamedTuple):
    job: ReadJob
    future: Future | None  # None: a non-tensor entry, decoded when its turn comes
    span: Span
    nbytes: int


class ReadWindow:
    """Runs one load's reads in plan order through ``pool``; ``run(job, target)`` fills a
    tensor on an item thread, ``hand_over(job)`` decodes a non-tensor entry and gives it to
    the planner."""

    def __init__(self, planner: LoadPlanner, pool: ThreadPoolExecutor, threads: int, max_bytes: int,
                 run: Callable[[ReadJob, torch.Tensor], torch.Tensor], hand_over: Callable[[ReadJob], None]) -> None:
        self._planner, self._pool, self._run, self._hand_over = planner, pool, run, hand_over
        self._threads, self._max_items, self._max_bytes = threads, 16 * threads, max_bytes
        self._pending: deque[_Pending] = deque()
        self._bytes = 0  # of the tensors in flight
        # memory of the tensors in flight, sorted; disjoint, as overlapping ones wait
        self._spans: list[tuple[str, int, int]] = []
        self._unknown = 0  # tensors in flight whose memory cannot be known

    def add(self, job: ReadJob) -> None:
        if not job.is_tensor:
            self._pending.append(_Pending(job, None, None, 0))
        else:
            target = self._planner.resolve_tensor(job.req).detach()
            span, nbytes = memory_span(target), target.nbytes
            while self._pending and (self._full(nbytes) or self._overlaps(span)):
                self._complete_oldest()
            self._pending.append(_Pending(job, self._pool.submit(self._run, job, target), span, nbytes))
            self._bytes += nbytes
            self._track(span, +1)
        while self._pending and self._pending[0].future is None:
            self._complete_oldest()

    def _full(self, nbytes: int) -> bool:
        n = len(self._pending)
        return n >= self._max_items or (n >= self._threads and self._bytes + nbytes > self._max_bytes)

    def _overlaps(self, span: Span) -> bool:
        """Whether ``span`` may share memory with a tensor in flight (its neighbours in the
        sorted, disjoint spans are the only candidates)."""
        if span is None:
            return bool(self._spans or self._unknown)
        if self._unknown:
            return True
        i = bisect.bisect_left(self._spans, span)
        return any(_overlap(span, self._spans[j]) for j in (i - 1, i) if 0 <= j < len(self._spans))

    def _track(self, span: Span, sign: int) -> None:
        if span is None:
            self._unknown += sign
        elif span[1] < span[2]:
            if sign > 0:
                bisect.insort(self._spans, span)
            else:
                del self._spans[bisect.bisect_left(self._spans, span)]

    def finish(self) -> None:
        while self._pending:
            self._complete_oldest()

    def _complete_oldest(self) -> None:
        job, future, span, nbytes = self._pending.popleft()
        if future is None:
            self._hand_over(job)
            return
        self._bytes -= nbytes
        self._track(span, -1)
        self._planner.commit_tensor(job.req, future.result())


def memory_span(tensor: torch.Tensor) -> Span:
    """The bytes ``tensor`` may touch, from its first element to its last (a strided view
    counts the gaps between its elements too)."""
    if tensor.numel() == 0:
        return ("", 0, 0)
    if is_traceable_wrapper_subclass(tensor) or tensor.device.type == "meta":
        return None
    extent = sum((n - 1) * abs(s) for n, s in zip(tensor.shape, tensor.stride())) + 1
    start = tensor.data_ptr()
    return (str(tensor.device), start, start + extent * tensor.element_size())


def _overlap(a: Span, b: Span) -> bool:
    if a is None or b is None:
        return True
    return a[0] == b[0] and a[1] < b[2] and b[1] < a[2]
