"""The proxy's own event loop: coroutines over epoll, in a thread of the node's process.

Why not trio here: a proxied login is a dozen socket operations, and under trio each one costs
a trip through its scheduler and cancel machinery. Measured on the benchmark machine a bare
trio relay (no codec, no routing) spent 1.2 ms of CPU per IMAP login, three times nginx's
whole mail proxy, while the same relay on plain epoll spent 0.34 ms. So the sessions run here:
the same `async def` code shape as trio (streams with receive_some/send_all, deadlines as
`with` blocks, child tasks), on a loop that resumes a coroutine straight from epoll.

What it offers, and nothing more:
- `Loop.spawn(coro)`, `Loop.run()` until `stop()`; `call_soon_threadsafe(fn)` from other threads.
- Traps a task awaits: `wait_readable(fd)`, `wait_writable(fd)`, `sleep_until(t)`, `checkpoint()`,
  `Event.wait()`, `Task.join()`, `run_in_thread(fn)`.
- `CancelScope` with a deadline (`move_on_after`, `fail_after`) and `cancel()`: a task waiting
  inside a scope that expires or is cancelled gets `Cancelled` thrown in, which the scope catches.
- `now()`: time.monotonic(), the loop's clock.

A task is driven by `coro.send`/`coro.throw`. An fd is registered with epoll once, edge-
triggered for both directions, at its first wait, and stays so until it closes (forget() just
before): no epoll call per wait. Edge-triggered means a task waits only once the fd has said it
is empty or full (EAGAIN, or a read shorter than asked for); an edge that comes while nobody
waits is kept and ends the next wait at once, and once the peer has closed (or an error came)
every wait on that side ends at once, since no further edge will come (a wait may end
spuriously: callers retry their call). A round runs the tasks epoll woke and then the ones
they make ready (a spawned task, an event's waiters, a wait whose edge came already), so a
login's steps do not each pay an epoll call; a task that yields (checkpoint) runs only after
the next poll, so a busy one cannot keep the others from their sockets. The loop records how
long each round of running tasks took in a StallWatch: /status shows the longest of the last
minute.
"""

from __future__ import annotations

import collections
import concurrent.futures
import heapq
import itertools
import logging
import os
import select
import threading
import time
import types
from collections.abc import Callable, Coroutine
from typing import Any

import attrs

from ..core.stall import StallWatch

log = logging.getLogger("meshmail.proxy")

#: The loop's clock in seconds: time.monotonic, or a test's MockClock while its loop runs
#: (callers look it up as loop.now at each call, so the swap reaches them).
now: Callable[[], float] = time.monotonic


_READ = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_WRITE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
_EDGES = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
_ENDS = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
#: Threads run_in_thread uses (name lookups of backends given by name).
THREADS = 4
#: Task steps one round may run beyond the tasks ready at its start: a task woken in a round
#: (spawned, its event set, an edge it waited for already there) runs in that same round
#: rather than after another epoll call, up to this many more.
EXTRA_STEPS = 1024


class Cancelled(BaseException):
    """Thrown into a task whose scope expired or was cancelled; the scope catches it."""


class TooSlowError(Exception):
    """A fail_after block ran out of time."""


@attrs.define(eq=False)
class CancelScope:
    """A block of a task's code that ends early at `deadline` (loop time) or on cancel().

    Like trio's: used as a `with` block inside a task; `cancelled_caught` says whether it ended
    that way. A task inside an expired or cancelled scope cannot wait any more: each trap raises
    Cancelled at once, until the scope's block is left.
    """

    deadline: float = float("inf")
    cancel_called: bool = False
    cancelled_caught: bool = False
    _task: Task | None = None

    def __enter__(self) -> CancelScope:
        task = _running()
        self._task = task
        task.scopes.append(self)
        return self

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: object) -> bool:
        assert self._task is not None
        self._task.scopes.remove(self)
        if isinstance(exc, Cancelled) and self._fired():
            self.cancelled_caught = True
            return True
        return False

    def cancel(self) -> None:
        """End the block: the task gets Cancelled at its current or next wait."""
        self.cancel_called = True
        if self._task is not None and self in self._task.scopes:
            self._task.poke()

    def _fired(self) -> bool:
        return self.cancel_called or now() >= self.deadline


def move_on_after(seconds: float) -> CancelScope:
    return CancelScope(deadline=now() + seconds)


def move_on_at(deadline: float) -> CancelScope:
    return CancelScope(deadline=deadline)


class fail_after:
    """A block that raises TooSlowError when it runs longer than `seconds`."""

    def __init__(self, seconds: float) -> None:
        self.scope = CancelScope(deadline=now() + seconds)

    def __enter__(self) -> CancelScope:
        return self.scope.__enter__()

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: object) -> bool:
        if self.scope.__exit__(kind, exc, tb):
            raise TooSlowError
        return False


@attrs.define(eq=False)
class Task:
    """A coroutine the loop drives, and what it waits for."""

    loop: Loop
    coro: Coroutine[Any, Any, Any]
    scopes: list[CancelScope] = attrs.Factory(list)
    #: What the task waits for now: ("read"|"write", fd), ("sleep", None), ("event", Event)...
    waiting: tuple[str, Any] | None = None
    #: Bumped on every wake, so that a thread's answer to an earlier wait finds itself stale.
    generation: int = 0
    #: When the current wait ends by itself (its sleep or the nearest scope deadline), and the
    #: earliest time the loop's timer heap holds for this task (one entry serves many waits).
    wake_at: float = float("inf")
    timer_at: float = float("inf")
    done: bool = False
    result: Any = None
    error: BaseException | None = None
    joiners: list[Task] = attrs.Factory(list)

    def cancel(self) -> None:
        """Cancel the whole task (as if its outermost scope were cancelled)."""
        scope = CancelScope(cancel_called=True)
        scope._task = self
        self.scopes.insert(0, scope)
        self.poke()

    def poke(self) -> None:
        """Wake the task if it waits, so that it meets its expired or cancelled scope."""
        if self.waiting is not None:
            self.loop._wake(self, None, Cancelled())

    def deadline(self) -> float:
        """The nearest deadline of the task's scopes; -inf when one of them is cancelled."""
        nearest = float("inf")
        for scope in self.scopes:
            if scope.cancel_called:
                return float("-inf")
            nearest = min(nearest, scope.deadline)
        return nearest

    async def join(self) -> None:
        """Wait until the task has ended (its errors stay its own: logged by the loop)."""
        if not self.done:
            await _trap("join", self)


@attrs.define(eq=False)
class Event:
    """Set once; wait() returns once it is set."""

    flag: bool = False
    _waiters: list[Task] = attrs.Factory(list)

    def is_set(self) -> bool:
        return self.flag

    def set(self) -> None:
        if self.flag:
            return
        self.flag = True
        waiters, self._waiters = self._waiters, []
        for task in waiters:
            task.loop._wake(task, None)

    async def wait(self) -> None:
        if not self.flag:
            await _trap("event", self)


@types.coroutine
def _trap(kind: str, subject: Any) -> Any:
    return (yield (kind, subject))


async def wait_readable(fd: int) -> None:
    await _trap("read", fd)


async def wait_writable(fd: int) -> None:
    await _trap("write", fd)


async def sleep_until(deadline: float) -> None:
    await _trap("sleep", deadline)


async def sleep(seconds: float) -> None:
    await _trap("sleep", now() + seconds)


async def checkpoint() -> None:
    """Let the other ready tasks run (a busy pump must not starve the loop)."""
    await _trap("yield", None)


def run(main: Coroutine[Any, Any, Any], clock: MockClock | None = None) -> Any:
    """Run `main` on a new loop in this thread until it ends; its result or error (for tests
    and tools: the node runs its loop in a thread of its own)."""
    proxy_loop = Loop(clock=clock)
    task = proxy_loop.spawn(main)

    async def watch() -> None:
        await task.join()
        proxy_loop.stop()

    proxy_loop.spawn(watch())
    proxy_loop.run()
    if not task.done:
        raise RuntimeError("the loop stopped before its main task ended")
    if task.error is not None:
        raise task.error
    return task.result


async def run_in_thread(fn: Callable[[], Any]) -> Any:
    """fn() in a worker thread (for the rare blocking call: a name lookup); its result or error."""
    return await _trap("thread", fn)


_local = threading.local()


def _running() -> Task:
    task = getattr(_local, "task", None)
    if task is None:
        raise RuntimeError("not inside a task of the proxy loop")
    return task


def current_loop() -> Loop:
    return _running().loop


def forget(fd: int) -> None:
    """Tell the running loop (if called from one of its tasks) that `fd` is about to close, or
    is a new socket's."""
    task = getattr(_local, "task", None)
    if task is not None:
        task.loop.forget(fd)


@attrs.define(eq=False)
class MockClock:
    """Simulated time for tests, as trio.testing.MockClock: it starts at the real monotonic time
    and, when the loop has waited `autojump` real seconds with nothing to do, jumps to the next
    timer, so a test of an hour-long timeout takes a moment."""

    autojump: float = 0.02
    offset: float = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


class Loop:
    """The loop: epoll, timers, ready tasks, and calls handed in from other threads."""

    def __init__(self, stall: StallWatch | None = None, clock: MockClock | None = None) -> None:
        self.clock = clock
        self.stall = stall or StallWatch()
        self._epoll = select.epoll()
        self._readers: dict[int, Task] = {}
        self._writers: dict[int, Task] = {}
        self._registered: set[int] = set()
        self._edges: dict[int, int] = {}  # fd -> edges that came while nobody waited: 1 read, 2 write
        self._ended: dict[int, int] = {}  # fd -> sides the peer closed or an error ended: every wait is over
        self._timers: list[tuple[float, int, Task]] = []
        self._sequence = itertools.count()
        self._ready: collections.deque[tuple[Task, Any, BaseException | None]] = collections.deque()
        #: Tasks that yielded (checkpoint): they run next round, after the loop has polled epoll.
        self._yielded: list[Task] = []
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self._wakeup_read, self._wakeup_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wakeup_read, select.EPOLLIN)
        self._threads: concurrent.futures.ThreadPoolExecutor | None = None
        self._wakeup_lock = threading.Lock()
        self._stopping = self._closed = False
        self._failure: BaseException | None = None
        self._live: set[Task] = set()

    # --- for other threads -----------------------------------------------------------------

    def call_soon_threadsafe(self, fn: Callable[[], None]) -> None:
        """Run fn() on the loop's thread soon (safe from any thread)."""
        with self._wakeup_lock:  # not while run() closes the pipe (its fd number could be reused)
            if self._closed:
                return  # the loop has ended: nothing would run it
            self._calls.append(fn)
            try:
                os.write(self._wakeup_write, b"\0")
            except BlockingIOError:
                pass  # the pipe is full: the loop wakes anyway

    def stop(self) -> None:
        """End run() (from the loop or any thread); tasks still open are closed."""
        self._stopping = True
        self.call_soon_threadsafe(lambda: None)

    def fail(self, error: BaseException) -> None:
        """End run() with `error` raised from it (from the loop's thread)."""
        self._failure = error
        self.stop()

    # --- tasks --------------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> Task:
        """Start running `coro` as a task (on the loop's thread)."""
        task = Task(self, coro)
        self._live.add(task)
        self._ready.append((task, None, None))
        return task

    def _wake(self, task: Task, value: Any, error: BaseException | None = None) -> None:
        """Make a waiting task ready again, with `value` or `error` to resume it with."""
        waiting = task.waiting
        if waiting is None:
            return
        task.waiting = None
        task.generation += 1
        kind, subject = waiting
        if kind == "read":
            self._readers.pop(subject, None)
        elif kind == "write":
            self._writers.pop(subject, None)
        elif kind == "event":
            if task in subject._waiters:
                subject._waiters.remove(task)
        elif kind == "join":
            if task in subject.joiners:
                subject.joiners.remove(task)
        self._ready.append((task, value, error))

    def _step(self, task: Task, value: Any, error: BaseException | None) -> None:
        if task.done:
            return
        _local.task = task
        try:
            request = task.coro.throw(error) if error is not None else task.coro.send(value)
        except StopIteration as stop:
            task.result = stop.value
            self._finish(task, None)
        except Cancelled:
            self._finish(task, None)
        except BaseException as exc:  # noqa: BLE001 (a task's error ends that task, never the loop)
            self._finish(task, exc)
        else:
            self._wait(task, *request)
        finally:
            _local.task = None

    def _finish(self, task: Task, error: BaseException | None) -> None:
        task.done = True
        task.error = error
        self._live.discard(task)
        if error is not None:
            log.error("a proxy task failed", exc_info=error)
        joiners, task.joiners = task.joiners, []
        for joiner in joiners:
            self._wake(joiner, None)

    def _wait(self, task: Task, kind: str, subject: Any) -> None:
        deadline = task.deadline() if task.scopes else float("inf")
        if deadline != float("inf") and deadline <= now():
            self._ready.append((task, None, Cancelled()))
            return
        if kind == "read" or kind == "write":
            side = 1 if kind == "read" else 2
            if (self._edges.get(subject, 0) | self._ended.get(subject, 0)) & side:  # over already
                self._edges[subject] = self._edges.get(subject, 0) & ~side
                task.generation += 1
                self._ready.append((task, None, None))
                return
            (self._readers if kind == "read" else self._writers)[subject] = task
            if subject not in self._registered:
                self._register(subject)
        task.waiting = (kind, subject)
        if kind == "sleep":
            deadline = min(deadline, subject)
        elif kind == "yield":
            task.waiting = None
            task.generation += 1
            self._yielded.append(task)
            return
        elif kind == "event":
            subject._waiters.append(task)
        elif kind == "join":
            if subject.done:
                self._wake(task, None)
                return
            subject.joiners.append(task)
        elif kind == "thread":
            self._thread(task, subject)
        task.wake_at = deadline
        if deadline < task.timer_at:
            task.timer_at = deadline
            heapq.heappush(self._timers, (deadline, next(self._sequence), task))

    def _expire(self, task: Task, when: float, at: float) -> None:
        """A timer entry of `task` for `when` came due at `at`: end its wait if that is due
        (a sleep returns, a scope deadline throws Cancelled), else keep a timer for it."""
        if task.timer_at == when:
            task.timer_at = float("inf")
        if task.waiting is None:
            return
        if task.wake_at <= at:
            expired = task.waiting[0] != "sleep" or task.deadline() <= at
            self._wake(task, None, Cancelled() if expired else None)
        elif task.wake_at < task.timer_at:
            task.timer_at = task.wake_at
            heapq.heappush(self._timers, (task.wake_at, next(self._sequence), task))

    def _thread(self, task: Task, fn: Callable[[], Any]) -> None:
        if self._threads is None:
            self._threads = concurrent.futures.ThreadPoolExecutor(THREADS, thread_name_prefix="proxy-lookup")
        generation = task.generation

        def finished(future: concurrent.futures.Future) -> None:
            def resume() -> None:
                if task.generation == generation:
                    error = future.exception()
                    self._wake(task, None if error else future.result(), error)

            self.call_soon_threadsafe(resume)

        self._threads.submit(fn).add_done_callback(finished)

    def _register(self, fd: int) -> None:
        self._edges.pop(fd, None)
        self._ended.pop(fd, None)
        try:
            self._epoll.register(fd, _EDGES)
        except FileExistsError:  # closed without forget() while its number lived on elsewhere
            self._epoll.modify(fd, _EDGES)
        self._registered.add(fd)

    def forget(self, fd: int) -> None:
        """Drop what the loop knows of `fd`: call just before closing it (the close ends its
        epoll registration; an fd that stays open must not be forgotten), and for a new socket
        (its number may be one closed without a word)."""
        self._registered.discard(fd)
        self._edges.pop(fd, None)
        self._ended.pop(fd, None)
        for waiters in (self._readers, self._writers):
            task = waiters.get(fd)
            if task is not None:
                self._wake(task, None, OSError(9, "closed while waited on"))

    # --- the loop -----------------------------------------------------------------------------

    def run(self) -> None:
        """Run until stop(); the thread that calls it is the loop's thread."""
        global now
        if self.clock is not None:
            now = self.clock
        try:
            while not self._stopping:
                self._round()
        finally:
            now = time.monotonic
            self._close_tasks()
            if self._threads is not None:
                self._threads.shutdown(wait=False, cancel_futures=True)
            self._epoll.close()
            with self._wakeup_lock:
                self._closed = True
                os.close(self._wakeup_read)
                os.close(self._wakeup_write)
        if self._failure is not None:
            raise self._failure

    def _close_tasks(self) -> None:
        """End the tasks still open when the loop stops: their finally blocks run now (a
        session closes its sockets) rather than whenever the garbage collector gets to them."""
        for task in list(self._live):
            try:
                task.coro.close()
            except BaseException as exc:  # noqa: BLE001 (a task that will not end must not stop the others)
                log.error("a proxy task did not end cleanly", exc_info=exc)
        self._live.clear()

    def _round(self) -> None:
        timeout = -1.0
        if self._ready or self._calls or self._yielded:
            timeout = 0.0
        elif self._timers:
            timeout = max(0.0, self._timers[0][0] - now())
        events = self._poll(timeout)
        began = now()
        if self._yielded:
            self._ready.extend((task, None, None) for task in self._yielded)
            self._yielded.clear()
        self._dispatch(events)
        while self._calls:
            self._calls.popleft()()
        while self._timers and self._timers[0][0] <= began:
            when, _, task = heapq.heappop(self._timers)
            self._expire(task, when, began)
        steps = len(self._ready) + EXTRA_STEPS
        while self._ready and steps:
            self._step(*self._ready.popleft())
            steps -= 1
        self.stall.record(began, now() - began)

    def _poll(self, timeout: float) -> list[tuple[int, int]]:
        clock = self.clock
        if clock is None or 0 <= timeout <= clock.autojump:
            return self._epoll.poll(timeout)
        events = self._epoll.poll(clock.autojump)
        if not events and self._timers:
            clock.offset += max(0.0, self._timers[0][0] - now())
        return events

    def _dispatch(self, events: list[tuple[int, int]]) -> None:
        """Wake the tasks that wait for what epoll reported."""
        for fd, mask in events:
            if fd == self._wakeup_read:
                try:
                    while os.read(self._wakeup_read, 4096):
                        pass
                except BlockingIOError:
                    pass
                continue
            if mask & _ENDS:  # no edge follows an end: a read that got the last bytes must not wait for one
                self._ended[fd] = self._ended.get(fd, 0) | (1 if mask & _ENDS == select.EPOLLRDHUP else 3)
            for events, side, waiters in ((_READ, 1, self._readers), (_WRITE, 2, self._writers)):
                if mask & events:
                    task = waiters.get(fd)
                    if task is not None:
                        self._wake(task, None)
                    else:
                        self._edges[fd] = self._edges.get(fd, 0) | side
