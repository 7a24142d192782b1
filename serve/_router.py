"""Routers: queue requests per handle, pick replicas (power of two choices), retry safely.

Every ``Router`` (one per handle and its ``options()`` copies) keeps its own FIFO queue and
``max_queued_requests`` count on top of the process's ``RoutingState`` of the deployment.
Everything here runs on the home loop, except ``Router.make_request`` which any thread may call.

Admission is implicit: a replica answers a request with REJECTED (full or draining, before any
user code ran) or with its outcome. A rejected request, or one whose connection broke before it
was written, goes back to the queue in its original place and is retried. One that was written
and then lost its connection fails with ``ReplicaDiedError``: it may have run, and nothing runs
twice.

Deadlines: a request made under a deadline (``serve._context.request_deadline``, or inherited
from the request a replica serves) fails with ``RequestTimeoutError`` at once if it has passed,
and otherwise when it passes, wherever the request is then: resolving its arguments, queued,
between retries, or sent (its replica got the time left and ends the work itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import random
import threading
import time
from typing import Any, Protocol

from serve import _tracing
from serve._context import current_deadline, current_request
from serve._custom_routing import pending_view
from serve._exchange import ConnectionLost
from serve._ingress import FED_METHODS
from serve._models import DeploymentID, ReplicaInfo, ReplicaSet
from serve._options import HandleOptions
from serve._policy import candidate_tiers, choose
from serve._request import Attempt, Request, RequestState, Reservation
from serve._routing_state import RoutingState
from serve._serialization import CODEC_NAMES, decode
from serve._settings import settings
from serve.config import BackpressureConfig
from serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaDiedError,
    ReplicaUnavailableError,
    RequestCancelledError,
    RequestTimeoutError,
    ServeError,
)
from serve.request_router._base import RouterFailure

STREAM_WINDOW = 64  # stream items a replica may send ahead of the consumer


class StateSource(Protocol):
    def routing_state(self, deployment_id: DeploymentID) -> RoutingState: ...


class ReplicaSkipped(ServeError):
    """A broadcast call could not reach its replica; it is left out."""


class Router:
    """The request queue of one handle (shared by its ``options()`` copies).

    It is the :class:`~serve._exchange.ReplyListener` of the requests it sends, and a listener
    of its deployment's state (replica sets, capacity changes, shutdown).
    """

    def __init__(self, source: StateSource, deployment_id: DeploymentID) -> None:
        self._source = source
        self.deployment_id = deployment_id
        self.prefer_local_routing = False
        self._state: RoutingState | None = None
        self._pending: list[tuple[int, Request]] = []
        self._lock = threading.Lock()
        self._num_queued = 0
        self._max_queued = -1
        self._backpressure: BackpressureConfig | None = None  # the deployment's HTTP answer
        self._seq = itertools.count()
        self._failed_passes = 0
        self._retry_timer: asyncio.TimerHandle | None = None
        self._pumping = False
        self._repump = False
        self._repump_probe = False
        self._rng = random.Random()
        self._custom_task: asyncio.Task[None] | None = None  # routing by a custom router
        self._custom_wake: asyncio.Event | None = None
        self._routing: Request | None = None  # the request the custom router chooses for
        self._routing_abandoned = False
        s = settings()
        self._stream_window_bytes = s.stream_window_bytes
        # A forwarded HTTP or WebSocket connection streams with the ingress window both ways.
        self._ingress_window = (s.websocket_max_queue, s.ingress_window_bytes)
        self.num_requests = 0

    def __repr__(self) -> str:
        return f"Router({self.deployment_id}, queued={self._num_queued})"

    @property
    def num_queued(self) -> int:
        return self._num_queued

    # Any thread.

    def make_request(
        self,
        options: HandleOptions,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        queued: bool = True,
    ) -> Request:
        """Reserve a queue slot (or raise BackPressureError) and build the request.

        Raises RequestTimeoutError, without queueing, if the deadline it inherits has passed.
        ``queued=False``: a request that never waits in the queue (``handle.dispatch`` into a
        held slot) takes no queue slot and is not subject to backpressure.
        """
        deadline_s = current_deadline()
        if deadline_s and time.monotonic() >= deadline_s:
            raise RequestTimeoutError(
                deployment=str(self.deployment_id), method=options.method_name
            )
        limit = self._max_queued
        with self._lock:
            if queued:
                if limit != -1 and self._num_queued >= limit:
                    answer = self._backpressure
                    raise BackPressureError(
                        num_queued_requests=self._num_queued,
                        max_queued_requests=limit,
                        deployment=str(self.deployment_id),
                        status_code=answer.status_code if answer else 503,
                        retry_after_s=answer.retry_after_s if answer else None,
                    )
                self._num_queued += 1
            self.num_requests += 1
        try:
            request = Request(
                next(self._seq),
                options,
                args,
                kwargs,
                parent=current_request(),
                on_cancel=self.cancel,
                deadline_s=deadline_s,
            )
        except BaseException:
            if queued:
                self._add_queued(-1)
            raise
        if request.stream:
            envelope = request.envelope
            if envelope.method in FED_METHODS:
                envelope.stream_window, envelope.stream_window_bytes = self._ingress_window
            else:
                envelope.stream_window = STREAM_WINDOW
                envelope.stream_window_bytes = self._stream_window_bytes
        request.holds_queue_slot = queued
        if _tracing.enabled:
            _tracing.start_route(request, self.deployment_id.app_name, self.deployment_id.name)
        return request

    def refused_request(self, options: HandleOptions, error: BaseException) -> Request:
        """A request that failed before it was queued (its response raises ``error``, as Ray's
        does when awaited). Any thread: nobody can be waiting on it yet."""
        request = Request(-1, options, (), {}, parent=None, on_cancel=self.cancel)
        request.state = RequestState.DONE
        if request.stream_buffer is not None:
            request.stream_buffer.close(error)
        request.completion.set_exception(error)
        return request

    def _add_queued(self, delta: int) -> None:
        with self._lock:
            self._num_queued += delta

    def _release_slot(self, request: Request) -> None:
        if request.holds_queue_slot:
            request.holds_queue_slot = False
            self._add_queued(-1)

    # Home loop: the deployment's state, and what it tells its listeners.

    def state(self) -> RoutingState:
        if self._state is None:
            self._state = self._source.routing_state(self.deployment_id)
            self._state.subscribe(self)
        return self._state

    def running_replicas_populated(self) -> bool:
        return self._state is not None and bool(self._state.routable)

    def load(self) -> tuple[int, int]:
        """(requests queued now, requests made so far), for autoscaling and metrics."""
        return self._num_queued, self.num_requests

    def on_replica_set(self, replica_set: ReplicaSet) -> None:
        self._max_queued = replica_set.max_queued_requests
        self._backpressure = replica_set.backpressure
        if not replica_set.exists or replica_set.unavailable:
            self.fail_all(self._gone(replica_set))
            return
        self._failed_passes = 0
        if self._pending:
            self.pump()

    def on_capacity(self) -> None:
        """A replica may take more now: try the waiting requests again."""
        if self._pending:
            self.pump()

    def on_closed(self, error: BaseException) -> None:
        self.fail_all(error)

    # Home loop: requests.

    def submit(self, request: Request) -> None:
        """Start a request made by make_request: resolve its inputs, then queue it."""
        if request.parent is not None:
            request.parent.children.add(request)
        if request.state == RequestState.DONE:
            return
        state = self.state()
        deadline_s = request.envelope.deadline_s
        if deadline_s:
            delay_s = deadline_s - time.monotonic()
            if delay_s <= 0:
                self._expire(request)
                return
            loop = asyncio.get_running_loop()
            request.deadline_timer = loop.call_later(delay_s, self._expire, request)
        if request.cancelled:
            self.finish(request, error=RequestCancelledError(request.request_id))
            return
        if request.inputs:
            self._resolve(request)
            return
        self._enqueue(request, state)

    def _resolve(self, request: Request) -> None:
        assert request.inputs is not None
        remaining = len(request.inputs)

        def on_input_done(_: Any) -> None:
            nonlocal remaining
            remaining -= 1
            if remaining or request.state != RequestState.RESOLVING:
                return
            for _, upstream in request.inputs or ():
                error = upstream.completion.error()
                if error is not None:
                    if isinstance(error, ReplicaDiedError):  # name both ends, as Ray does
                        error = ReplicaDiedError(
                            f"Request {request.request_id} to {self.deployment_id} "
                            f"({request.method}) did not run: a DeploymentResponse it was "
                            f"given failed. {error}"
                        )
                    self.finish(request, error=error)
                    return
            try:
                request.encode(*request.resolved_arguments())
            except Exception as exc:
                self.finish(request, error=exc)
                return
            self._enqueue(request, self.state())

        for _, upstream in request.inputs:
            upstream.completion.add_done_callback(on_input_done)

    def _enqueue(self, request: Request, state: RoutingState) -> None:
        if isinstance(request.attempt, Reservation):  # handle.dispatch(): no queue, no choice
            self._dispatch(request, request.attempt)
            return
        replica_set = state.replica_set
        if replica_set is not None and (not replica_set.exists or replica_set.unavailable):
            self.finish(request, error=self._gone(replica_set))
            return
        self._requeue(request)
        # The first pass for a request arriving at an idle queue may probe; while a retry is
        # scheduled, the backoff schedule decides when to probe again.
        self.pump(probe=self._retry_timer is None)

    def _gone(self, replica_set: ReplicaSet) -> DeploymentUnavailableError:
        return DeploymentUnavailableError(
            str(self.deployment_id),
            replica_set.unavailable or "it does not exist (deleted, or not deployed yet).",
        )

    def _requeue(self, request: Request) -> None:
        """(Back) into the queue, in its original place; it counts as queued again."""
        request.state = RequestState.QUEUED
        if not request.holds_queue_slot:
            request.holds_queue_slot = True
            self._add_queued(1)
        heapq.heappush(self._pending, (request.seq, request))

    def pump(self, probe: bool = False) -> None:
        """Send waiting requests, oldest first, while a replica can take them.

        Only a ``probe`` pass asks replicas for their load; other passes (after a reply, a probe
        answer, a new replica set) use what is known, so answers never trigger a probe storm.
        """
        if self._pumping:
            self._repump = True
            self._repump_probe |= probe
            return
        self._pumping = True
        try:
            self._repump = True
            self._repump_probe = probe
            while self._repump:
                self._repump = False
                probing, self._repump_probe = self._repump_probe, False
                self._pump_once(probing)
        finally:
            self._pumping = False

    def _pump_once(self, probe: bool) -> None:
        state = self.state()
        if state.custom is not None:
            self._route_custom(state)
            return
        pending = self._pending
        now = time.monotonic()
        while pending:
            request = pending[0][1]
            if request.state != RequestState.QUEUED:
                heapq.heappop(pending)
                continue
            deadline_s = request.envelope.deadline_s
            if deadline_s and now >= deadline_s:  # never sent, nor retried, past its deadline
                heapq.heappop(pending)
                self._expire(request)
                continue
            if not state.routable:
                state.push_load()  # scaled to zero: the autoscaler learns of the wait now
                return  # wait for the controller to publish replicas
            chosen = self._choose_default(request, state, probe, now)
            if chosen is None:
                if probe:
                    self._failed_passes += 1
                self._schedule_retry()
                return
            heapq.heappop(pending)
            self._failed_passes = 0
            self._send(request, chosen, state)

    def _choose_default(
        self, request: Request, state: RoutingState, probe: bool, now: float
    ) -> ReplicaInfo | None:
        """Power of two choices, tier by tier; with ``probe``, ask the replicas it knows
        nothing of (or thinks full) for their load."""
        queue_lens = state.queue_lens

        def estimate(replica_id: str) -> int | None:
            return queue_lens.estimate(replica_id, now)

        for tier in candidate_tiers(
            state.routable,
            model_id=request.model_id,
            local_host=state.local_host,
            prefer_local=self.prefer_local_routing or request.prefer_local,
        ):
            choice = choose(tier, estimate, self._rng)
            if probe:
                for replica in choice.probe:
                    state.probe(replica, self._failed_passes)
            if choice.replica is not None:
                return choice.replica
        return None

    # Home loop: a custom request router (request_router_config) picks the replicas.

    def _route_custom(self, state: RoutingState) -> None:
        """Let the routing task take the waiting requests, oldest first."""
        if self._custom_task is None and self._pending:
            self._custom_task = asyncio.get_running_loop().create_task(
                self._custom_loop(state), name=f"router:custom:{self.deployment_id}"
            )
        if self._custom_wake is not None:
            self._custom_wake.set()

    def _head(self) -> Request | None:
        """The oldest waiting request (dropping finished ones, and expiring late ones)."""
        pending = self._pending
        while pending:
            request = pending[0][1]
            deadline_s = request.envelope.deadline_s
            if request.state != RequestState.QUEUED:
                heapq.heappop(pending)
            elif deadline_s and time.monotonic() >= deadline_s:
                heapq.heappop(pending)
                self._expire(request)
            else:
                return request
        return None

    def _take(self, request: Request) -> None:
        """Remove ``request`` from the queue (it may no longer be first)."""
        if self._pending and self._pending[0][1] is request:
            heapq.heappop(self._pending)
            return
        self._pending = [entry for entry in self._pending if entry[1] is not request]
        heapq.heapify(self._pending)

    async def _custom_loop(self, state: RoutingState) -> None:
        """Route waiting requests one at a time through the custom router; a request whose
        routing failed goes by power of two choices (logged by the router's FallbackLog)."""
        self._custom_wake = wake = asyncio.Event()
        try:
            while True:
                custom = state.custom
                request = self._head()
                if custom is None or request is None:
                    return
                if not state.routable:
                    state.push_load()  # scaled to zero: the autoscaler learns of the wait now
                    wake.clear()
                    await wake.wait()
                    continue
                pending = pending_view(request, self.deployment_id.app_name)
                self._routing = request
                request.completion.add_done_callback(self._abandon_routing)
                chosen: Any = None
                error: BaseException | None = None
                try:
                    chosen = await custom.choose(pending)
                except RouterFailure as exc:
                    error = exc
                except asyncio.CancelledError:
                    if not self._routing_abandoned:
                        raise
                    self._routing_abandoned = False
                    task = asyncio.current_task()
                    if task is not None and task.uncancel():
                        raise  # cancelled from outside too
                finally:
                    self._routing = None
                if request.state != RequestState.QUEUED:
                    continue  # it finished (cancelled, expired) while the router chose
                if error is None:
                    info = custom.routable(chosen)
                    if info is None:
                        continue  # that replica went away meanwhile: ask again
                else:
                    custom.log.failed("choose_replicas", error)
                    info = self._choose_default(request, state, True, time.monotonic())
                    if info is None:
                        self._failed_passes += 1
                        wake.clear()
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(state.backoff_s(self._failed_passes)):
                                await wake.wait()
                        continue
                self._failed_passes = 0
                self._take(request)
                if self._send(request, info, state):
                    custom.routed(pending, request, info)
        finally:
            self._custom_task = None
            self._custom_wake = None

    def _abandon_routing(self, _: Any) -> None:
        """A request finished while the custom router was choosing for it: stop choosing."""
        routing, task = self._routing, self._custom_task
        if routing is None or task is None or self._routing_abandoned:
            return
        if routing.state == RequestState.DONE:
            self._routing_abandoned = True
            task.cancel()

    def _schedule_retry(self) -> None:
        """Arrange the next probing pass: at once after one failure, then with backoff."""
        if self._retry_timer is not None:
            return
        delay_s = self.state().backoff_s(self._failed_passes)
        loop = asyncio.get_running_loop()
        self._retry_timer = loop.call_later(delay_s, self._on_retry_timer)

    def _on_retry_timer(self) -> None:
        self._retry_timer = None
        if self._pending:
            self.pump(probe=True)

    def _send(self, request: Request, replica: ReplicaInfo, state: RoutingState) -> bool:
        """Try ``request`` on ``replica``: False if its connection broke first (the request
        is back in the queue, or skipped if a broadcast call)."""
        conn = state.connection(replica)
        envelope = request.envelope
        try:
            if request.reserve_only:
                frame_id = conn.reserve(self, request)
            else:
                frame_id = conn.send(envelope, self, request)
        except ConnectionLost as exc:
            state.exclude(replica.replica_id)
            if envelope.no_reject:
                self.finish(request, error=ReplicaSkipped(str(exc)))
                return False
            self._requeue(request)
            self._repump = True
            return False
        request.attempt = Attempt(replica, conn, frame_id)
        request.state = RequestState.SENT
        if request.fed:
            for payload in request.fed:
                conn.feed(frame_id, payload)
        self._release_slot(request)
        state.queue_lens.sent(replica.replica_id, frame_id)
        return True

    def _dispatch(self, request: Request, reservation: Reservation) -> None:
        """Send a request in the slot its reservation holds (``handle.dispatch``); no queue."""
        try:
            reservation.conn.send(request.envelope, self, request, reservation.frame_id)
        except ConnectionLost as exc:
            self.finish(request, error=_unavailable(reservation, exc))
            return
        request.state = RequestState.SENT
        self._release_slot(request)

    def release(self, reservation: Reservation) -> None:
        """Give back the slot of a reservation that was never dispatched."""
        reservation.conn.release(reservation.frame_id)

    def drop_reservation(self, request: Request) -> None:
        """Its chooser went away (cancelled): cancel it, or give back the slot it got."""
        if request.state != RequestState.DONE:
            self.cancel(request)
        elif request.completion.error() is None:
            self.release(request.completion.outcome())

    def send_to(self, request: Request, replica: ReplicaInfo) -> None:
        """Send a request to one given replica (broadcast), bypassing the queue."""
        request.state = RequestState.QUEUED
        self._send(request, replica, self.state())

    # ReplyListener: what connections report (home loop).

    def on_rejected(self, request: Request, draining: bool) -> None:
        state = self.state()
        attempt = request.attempt
        assert attempt is not None  # only an attempt is answered
        if draining:
            state.exclude(attempt.replica.replica_id)
        if isinstance(attempt, Reservation):  # its slot was not there: it cannot go elsewhere
            self.finish(request, error=_unavailable(attempt, None))
        elif request.state == RequestState.SENT:
            self._requeue(request)
        state.wake()

    def on_reserved(self, request: Request) -> None:
        attempt = request.attempt
        assert attempt is not None  # only an attempt is answered
        if request.state != RequestState.SENT:  # cancelled meanwhile: the slot goes back
            attempt.conn.release(attempt.frame_id)
            return
        self.finish(request, value=Reservation(attempt.replica, attempt.conn, attempt.frame_id))

    def on_result(self, request: Request, body: memoryview, buffers: list[bytes] | None) -> None:
        if request.state != RequestState.DONE:
            try:
                value = decode(request.envelope.response_codec, body, buffers)
            except Exception as exc:
                self.finish(request, error=_decode_error(request, exc))
            else:
                self.finish(request, value=value)
        self.state().wake()

    def on_error(self, request: Request, error: BaseException, cancelled: bool) -> None:
        self.finish(
            request, error=RequestCancelledError(request.request_id) if cancelled else error
        )
        self.state().wake()

    def on_input_read(self, request: Request, count: int, nbytes: int) -> None:
        request.fed = ADMITTED  # reading proves admission: no re-feeding from now on
        if request.window is not None:
            request.window.read(count, nbytes)

    def on_item(self, request: Request, body: memoryview, buffers: list[bytes] | None) -> None:
        if request.fed is not None:
            request.fed = ADMITTED  # an item proves admission: no re-feeding from now on
        buffer = request.stream_buffer
        if buffer is not None and request.state != RequestState.DONE:
            buffer.push((body, buffers))

    def on_end(self, request: Request) -> None:
        self.finish(request, value=None)
        self.state().wake()

    def on_lost(self, request: Request, error: ConnectionLost, written: bool) -> None:
        attempt = request.attempt
        if request.state != RequestState.SENT or attempt is None:
            return
        if written and not request.reserve_only:  # a RESERVE runs nothing: it may go elsewhere
            self.finish(
                request,
                error=ReplicaDiedError(
                    f"Replica {attempt.replica.replica_id} of {self.deployment_id} died while "
                    f"handling request {request.request_id} ({request.method}): {error}. The "
                    "request may have partly run; it was not retried."
                ),
            )
        elif request.envelope.no_reject:  # a broadcast call belongs to its replica
            self.finish(request, error=ReplicaSkipped(str(error)))
        elif isinstance(attempt, Reservation):  # the slot it was to run in is gone
            self.finish(request, error=_unavailable(attempt, error))
        elif error.retryable:
            self._requeue(request)
            # the connection's owner wakes routers once it dropped the replica
        else:
            self.finish(request, error=ServeError(str(error)))

    # Outcomes.

    def finish(
        self, request: Request, *, value: Any = None, error: BaseException | None = None
    ) -> None:
        if request.state == RequestState.DONE:
            return
        attempt = request.attempt
        if isinstance(attempt, Reservation) and request.state != RequestState.SENT:
            self.release(attempt)  # never sent: its held slot goes unused
        request.state = RequestState.DONE
        self._release_slot(request)
        timer = request.deadline_timer
        if timer is not None:
            request.deadline_timer = None
            timer.cancel()
        if request.parent is not None:
            request.parent.children.discard(request)
        if request.span is not None:
            _tracing.end_route(request, error)
        buffer = request.stream_buffer
        if buffer is not None:
            buffer.close(error)
        if error is not None:
            request.completion.set_exception(error)
        else:
            request.completion.set_result(value)

    def cancel(self, request: Request, expired: bool = False) -> None:
        """Cancel a request: drop it if still queued, else tell its replica.

        ``expired``: its deadline passed instead (see :meth:`_expire`).
        """
        if expired:
            self._expire(request)
            return
        request.cancelled = True
        if request.state == RequestState.DONE:
            return
        attempt = request.attempt
        if request.state == RequestState.SENT and attempt is not None:
            attempt.conn.cancel(attempt.frame_id)
        error = RequestCancelledError(request.request_id)
        if request.stream_buffer is not None:
            request.stream_buffer.close(error, drop=True)  # the next read raises, as in Ray
        self.finish(request, error=error)

    def _expire(self, request: Request) -> None:
        """The request's deadline passed: it fails with RequestTimeoutError wherever it is.

        A sent request is not cancelled on its replica: the replica got the time left with it
        and ends the work itself at the deadline, reporting the timeout (ignored here by then).
        """
        if request.state == RequestState.DONE:
            return
        envelope = request.envelope
        self.finish(
            request,
            error=RequestTimeoutError(
                deployment=str(self.deployment_id),
                method=envelope.method,
                timeout_s=envelope.deadline_s - request.created_s,
            ),
        )

    def credit(self, request: Request, count: int, nbytes: int) -> None:
        """The consumer of a stream read ``count`` items of ``nbytes``: the replica may send
        that much more."""
        attempt = request.attempt
        if request.state == RequestState.SENT and attempt is not None:
            attempt.conn.credit(attempt.frame_id, count, nbytes)

    def feed(self, request: Request, payload: bytes) -> None:
        """One more input for a running streaming request (see ``FRAME_KIND_INPUT``)."""
        if request.state == RequestState.DONE:
            return
        if request.fed is not ADMITTED:
            if request.fed is None:
                request.fed = []
            request.fed.append(payload)  # type: ignore[union-attr]
        attempt = request.attempt
        if request.state == RequestState.SENT and attempt is not None:
            attempt.conn.feed(attempt.frame_id, payload)

    def decode_item(self, request: Request, item: tuple[memoryview, list[bytes] | None]) -> Any:
        try:
            return decode(request.envelope.response_codec, *item)
        except Exception as exc:
            raise _decode_error(request, exc) from exc

    def fail_all(self, error: BaseException) -> None:
        pending, self._pending = self._pending, []
        for _, request in pending:
            self.finish(request, error=error)
        if self._custom_wake is not None:
            self._custom_wake.set()  # the custom routing task finds the queue empty and ends


ADMITTED: tuple[()] = ()  # Request.fed once the replica admitted it


def _unavailable(reservation: Reservation, error: BaseException | None) -> ReplicaUnavailableError:
    why = f": {error}" if error is not None else " (it no longer holds the slot)"
    return ReplicaUnavailableError(
        f"The replica chosen for this request ({reservation.replica.replica_id}) is no "
        f"longer available{why}. The request did not run; choose a replica again."
    )


def _decode_error(request: Request, exc: Exception) -> TypeError:
    return TypeError(
        f"Could not decode the result of {request.method} with the "
        f"{CODEC_NAMES[request.envelope.response_codec]} codec: {exc}"
    )
