"""The server-wide budget for results that are computed but not yet sent.

Every call reserves the (estimated) size of its results before they are
computed and gives it back once the transport has written them; a caller that
stops reading keeps its own reservation and nothing more. When the budget is
full, new work waits in line (first come, first served) up to a bound, then
gets RESOURCE_EXHAUSTED: the server never computes what it has no room to hold.

Used from the event loop only.
"""

from __future__ import annotations

import asyncio
import collections
import math

from ..errors import ResourceExhausted


class Lease:
    """Bytes held in the budget; `release()` gives them back (idempotent)."""

    __slots__ = ("_budget", "nbytes")

    def __init__(self, budget: ResultBudget | None, nbytes: int) -> None:
        self._budget = budget
        self.nbytes = nbytes

    def release(self) -> None:
        budget, self._budget = self._budget, None
        if budget is not None:
            budget._give_back(self.nbytes)

    def release_when_done(self, call: object) -> None:
        """`release` as a done-callback of the call that sends the result."""
        self.release()

    def __del__(self) -> None:  # a lease dropped without release must not leak budget
        self.release()


class ResultBudget:
    def __init__(self, capacity: int, max_wait: float) -> None:
        self.capacity = capacity
        self.max_wait = max_wait
        self.held = 0
        self.peak = 0
        self.waited = 0
        self.refused = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    def _fits(self, nbytes: int) -> bool:
        return self.held + nbytes <= self.capacity

    def _take(self, nbytes: int) -> Lease:
        self.held += nbytes
        self.peak = max(self.peak, self.held)
        return Lease(self, nbytes)

    def _clamp(self, nbytes: int) -> int:
        # A result larger than the whole budget runs when nothing else is held.
        return min(max(nbytes, 0), self.capacity)

    def try_acquire(self, nbytes: int) -> Lease | None:
        """A lease now, or None when it does not fit (or others are already waiting)."""
        nbytes = self._clamp(nbytes)
        if self._waiters or not self._fits(nbytes):
            return None
        return self._take(nbytes)

    async def acquire(self, nbytes: int, timeout: float | None) -> Lease:
        """Wait in line for room; ResourceExhausted after min(timeout, max_wait) seconds."""
        lease = self.try_acquire(nbytes)
        if lease is not None:
            return lease
        nbytes = self._clamp(nbytes)
        limit = self.max_wait if timeout is None else min(timeout, self.max_wait)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (nbytes, waiter)
        self._waiters.append(entry)
        self.waited += 1
        try:
            await asyncio.wait_for(asyncio.shield(waiter), None if math.isinf(limit) else max(limit, 0))
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():  # granted just as the wait ran out
                return Lease(self, nbytes)
            self._drop(entry)
            self.refused += 1
            raise ResourceExhausted(
                f"{self.held / 2**20:.0f} MiB of results are waiting to be read by their callers, the whole "
                f"max_pending_result_mib={self.capacity / 2**20:.0f} budget; waited {limit:.1f} s. Retry with "
                "backoff, read streamed results as they come, or ask for less (FLOAT16, fewer layers/heads, "
                "top_k only)") from None
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._give_back(nbytes)
            else:
                self._drop(entry)
            raise
        return Lease(self, nbytes)

    def _drop(self, entry: tuple[int, asyncio.Future[None]]) -> None:
        try:
            self._waiters.remove(entry)
        except ValueError:
            pass
        entry[1].cancel()
        self._wake()

    def _give_back(self, nbytes: int) -> None:
        self.held -= nbytes
        self._wake()

    def _wake(self) -> None:
        """Grant waiters in order while the first one fits."""
        while self._waiters and self._fits(self._waiters[0][0]):
            nbytes, waiter = self._waiters.popleft()
            if waiter.done():
                continue
            self.held += nbytes
            self.peak = max(self.peak, self.held)
            waiter.set_result(None)
