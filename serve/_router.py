"""Routers: queue requests per handle, pick replicas (power of two choices), retry safely.

Every ``Router`` (one per handle and its ``options()`` copies) keeps its own FIFO queue and
``max_queued_requests`` count on top of the process's ``DeploymentState`` of the deployment.
Everything here runs on the home loop, except ``Router.make_call`` which any thread may call.

A request never reached user code if the replica rejected it, was draining, or its connection
broke before the admission answer: such a request goes back to the queue in its original place
and is retried. Once admitted, a lost connection fails it with ``ReplicaDiedError``.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
import threading
import time
from typing import TYPE_CHECKING, Any

from serve._call import Call, CallState
from serve._context import current_request
from serve._deployment_state import DeploymentState, StateSource
from serve._models import DeploymentID, ReplicaInfo, ReplicaSet
from serve._policy import backoff_s, candidate_tiers, choose
from serve._rpc.connection import ConnectionLost
from serve._serialization import decode
from serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaDiedError,
    RequestCancelledError,
    ServeError,
)

if TYPE_CHECKING:
    from serve._options import HandleOptions

STREAM_WINDOW = 64  # stream items a replica may send ahead of the consumer


class ReplicaSkipped(ServeError):
    """A broadcast call could not reach its replica before admission; it is left out."""


class Router:
    """The request queue of one handle (shared by its ``options()`` copies)."""

    def __init__(self, client: StateSource, deployment_id: DeploymentID, handle_id: str) -> None:
        self._client = client
        self.deployment_id = deployment_id
        self.handle_id = handle_id
        self.prefer_local_routing = False
        self._state: DeploymentState | None = None
        self._pending: list[tuple[int, Call]] = []
        self._lock = threading.Lock()
        self._num_queued = 0
        self._max_queued = -1
        self._seq = itertools.count()
        self._failed_passes = 0
        self._retry_timer: asyncio.TimerHandle | None = None
        self._pumping = False
        self._repump = False
        self._repump_probe = False
        self._rng = random.Random()
        self.num_requests = 0

    def __repr__(self) -> str:
        return f"Router({self.deployment_id}, queued={self._num_queued})"

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    @property
    def num_queued(self) -> int:
        return self._num_queued

    # Any thread.

    def make_call(
        self, options: HandleOptions, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Call:
        """Reserve a queue slot (or raise BackPressureError) and build the request."""
        limit = self._max_queued
        with self._lock:
            if limit != -1 and self._num_queued >= limit:
                raise BackPressureError(
                    num_queued_requests=self._num_queued,
                    max_queued_requests=limit,
                    deployment=str(self.deployment_id),
                )
            self._num_queued += 1
            self.num_requests += 1
        try:
            call = Call(self, next(self._seq), options, args, kwargs, current_request())
        except BaseException:
            self._release_slot_count()
            raise
        call.holds_queue_slot = True
        return call

    def _release_slot_count(self) -> None:
        with self._lock:
            self._num_queued -= 1

    def _release_slot(self, call: Call) -> None:
        if call.holds_queue_slot:
            call.holds_queue_slot = False
            self._release_slot_count()

    # Home loop.

    def state(self) -> DeploymentState:
        if self._state is None:
            self._state = self._client.deployment_state(self.deployment_id)
            self._state.add_router(self)
        return self._state

    def on_replica_set(self, replica_set: ReplicaSet) -> None:
        self._max_queued = replica_set.max_queued_requests
        if not replica_set.exists:
            error = self._gone()
            for _, call in self._pending:
                self.finish(call, error=error)
            self._pending.clear()
            return
        self._failed_passes = 0
        if self._pending:
            self.pump()

    def submit(self, call: Call) -> None:
        """Start a request made by make_call: resolve its inputs, then queue it."""
        if call.parent is not None:
            call.parent.children.add(call)
        if call.state == CallState.DONE:
            return
        state = self.state()
        if call.cancelled:
            self.finish(call, error=RequestCancelledError(call.request_id))
            return
        if call.inputs:
            self._resolve(call)
            return
        self._enqueue(call, state)

    def _resolve(self, call: Call) -> None:
        assert call.inputs is not None
        remaining = len(call.inputs)

        def on_input_done(_: Any) -> None:
            nonlocal remaining
            remaining -= 1
            if remaining or call.state != CallState.RESOLVING:
                return
            for _, upstream in call.inputs or ():
                error = upstream.completion.error()
                if error is not None:
                    self.finish(call, error=error)
                    return
            try:
                call.encode(*call.resolved_arguments())
            except Exception as exc:
                self.finish(call, error=exc)
                return
            self._enqueue(call, self.state())

        for _, upstream in call.inputs:
            upstream.completion.add_done_callback(on_input_done)

    def _enqueue(self, call: Call, state: DeploymentState) -> None:
        replica_set = state.replica_set
        if replica_set is not None and not replica_set.exists:
            self.finish(call, error=self._gone())
            return
        self._requeue(call)
        # The first pass for a request arriving at an idle queue may probe; while a retry is
        # scheduled, the backoff schedule decides when to probe again.
        self.pump(probe=self._retry_timer is None)

    def _gone(self) -> DeploymentUnavailableError:
        return DeploymentUnavailableError(
            str(self.deployment_id), "it does not exist (deleted, or not deployed yet)."
        )

    def _requeue(self, call: Call) -> None:
        """(Back) into the queue, in its original place."""
        call.state = CallState.QUEUED
        call.conn = None
        heapq.heappush(self._pending, (call.seq, call))

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
        pending = self._pending
        rng = self._rng
        queue_lens = state.queue_lens
        now = time.monotonic()

        def estimate(replica_id: str) -> int | None:
            return queue_lens.estimate(replica_id, now)

        while pending:
            call = pending[0][1]
            if call.state != CallState.QUEUED:
                heapq.heappop(pending)
                continue
            candidates = state.routable
            if not candidates:
                state.push_load()  # scaled to zero: the autoscaler learns of the wait now
                return  # wait for the controller to publish replicas
            chosen = None
            for tier in candidate_tiers(
                candidates,
                model_id=call.model_id,
                local_host=state.local_host,
                prefer_local=self.prefer_local_routing or call.prefer_local,
            ):
                choice = choose(tier, estimate, rng)
                if probe:
                    for replica in choice.probe:
                        state.probe(replica, self._failed_passes)
                if choice.replica is not None:
                    chosen = choice.replica
                    break
            if chosen is None:
                if probe:
                    self._failed_passes += 1
                self._schedule_retry()
                return
            heapq.heappop(pending)
            self._failed_passes = 0
            self._send(call, chosen, state)

    def _schedule_retry(self) -> None:
        """Arrange the next probing pass: at once after one failure, then with backoff."""
        if self._retry_timer is not None:
            return
        delay_s = backoff_s(self._failed_passes)
        loop = asyncio.get_running_loop()
        self._retry_timer = loop.call_later(delay_s, self._on_retry_timer)

    def _on_retry_timer(self) -> None:
        self._retry_timer = None
        if self._pending:
            self.pump(probe=True)

    def _send(self, call: Call, replica: ReplicaInfo, state: DeploymentState) -> None:
        conn = state.connection(replica)
        try:
            call.frame_id = conn.send_request(
                call,
                method=call.method,
                request_codec=call.request_codec,
                response_codec=call.response_codec,
                args=call.args_blob,
                kwargs=call.kwargs_blob,
                request_id=call.request_id,
                model_id=call.model_id,
                stream=call.stream,
                no_reject=call.no_reject,
                stream_window=STREAM_WINDOW if call.stream else 0,
                buffers=call.buffers,
                args_buffer_count=call.args_buffer_count,
            )
        except ConnectionLost as exc:
            state.exclude(replica.replica_id)
            if call.no_reject:
                self.finish(call, error=ReplicaSkipped(str(exc)))
                return
            self._requeue(call)
            self._repump = True
            return
        call.state = CallState.SENT
        call.replica_id = replica.replica_id
        call.conn = conn
        call.answered = False
        state.queue_lens.sent(replica.replica_id)

    # Replies (home loop), via Call's Exchange methods.

    def _answered(self, call: Call, state: DeploymentState) -> None:
        """The replica answered the call (or its connection did): it no longer counts as sent
        without an answer in the queue-length estimate. Idempotent."""
        if not call.answered:
            call.answered = True
            state.queue_lens.answered(call.replica_id)

    def _admitted(self, call: Call, state: DeploymentState) -> None:
        """The replica admitted the call (said ACCEPTED, or already sent its outcome, which can
        overtake ACCEPTED on the other stream). Idempotent."""
        self._answered(call, state)
        if call.state == CallState.SENT:
            call.state = CallState.ACCEPTED
        self._release_slot(call)

    def on_accepted(self, call: Call, ongoing: int) -> None:
        state = self.state()
        self._admitted(call, state)
        state.queue_lens.report(call.replica_id, ongoing, time.monotonic())

    def on_rejected(self, call: Call, ongoing: int, draining: bool) -> None:
        state = self.state()
        self._answered(call, state)
        state.queue_lens.report(call.replica_id, ongoing, time.monotonic())
        if draining:
            state.exclude(call.replica_id)
        if call.state == CallState.SENT:
            self._requeue(call)
        state.wake()

    def on_result(
        self, call: Call, body: memoryview, ongoing: int, buffers: list[bytes] | None
    ) -> None:
        state = self.state()
        self._admitted(call, state)
        state.queue_lens.report(call.replica_id, ongoing, time.monotonic())
        if call.state != CallState.DONE:
            try:
                value = decode(call.response_codec, body, buffers)
            except Exception as exc:
                self.finish(call, error=_decode_error(call, exc))
            else:
                self.finish(call, value=value)
        state.wake()

    def on_error(self, call: Call, error: BaseException, cancelled: bool, ongoing: int) -> None:
        state = self.state()
        self._admitted(call, state)
        state.queue_lens.report(call.replica_id, ongoing, time.monotonic())
        self.finish(call, error=RequestCancelledError(call.request_id) if cancelled else error)
        state.wake()

    def on_item(self, call: Call, body: memoryview, buffers: list[bytes] | None) -> None:
        if not call.answered:
            self._admitted(call, self.state())
        buffer = call.stream_buffer
        if buffer is not None and call.state != CallState.DONE:
            buffer.push((body, buffers))

    def on_end(self, call: Call, ongoing: int) -> None:
        state = self.state()
        self._admitted(call, state)
        state.queue_lens.report(call.replica_id, ongoing, time.monotonic())
        self.finish(call, value=None)
        state.wake()

    def on_lost(self, call: Call, error: ConnectionLost) -> None:
        self._answered(call, self.state())
        if call.state == CallState.SENT:
            if call.no_reject:  # a broadcast call belongs to its replica: leave it out
                self.finish(call, error=ReplicaSkipped(str(error)))
            elif error.retryable:
                self._requeue(call)
                # the connection's owner wakes routers once it dropped the replica
            else:
                self.finish(call, error=ServeError(str(error)))
        elif call.state == CallState.ACCEPTED:
            self.finish(
                call,
                error=ReplicaDiedError(
                    f"Replica {call.replica_id} of {self.deployment_id} died while handling "
                    f"request {call.request_id} ({call.method}): {error}. The request may have "
                    "partly run; it was not retried."
                ),
            )

    # Outcomes.

    def finish(self, call: Call, *, value: Any = None, error: BaseException | None = None) -> None:
        if call.state == CallState.DONE:
            return
        call.state = CallState.DONE
        self._release_slot(call)
        if call.parent is not None:
            call.parent.children.discard(call)
        buffer = call.stream_buffer
        if buffer is not None:
            buffer.close(error)
        if error is not None:
            call.completion.set_exception(error)
        else:
            call.completion.set_result(value)

    def cancel(self, call: Call) -> None:
        """Cancel a request: drop it if still queued, else tell its replica."""
        call.cancelled = True
        if call.state == CallState.DONE:
            return
        if call.state in (CallState.SENT, CallState.ACCEPTED) and call.conn is not None:
            call.conn.cancel(call.frame_id)
        error = RequestCancelledError(call.request_id)
        if call.stream_buffer is not None:
            call.stream_buffer.close(error, drop=True)  # the next read raises, as in Ray
        self.finish(call, error=error)

    def send_to(self, call: Call, replica: ReplicaInfo) -> None:
        """Send a call to one given replica (broadcast), bypassing the queue."""
        call.state = CallState.QUEUED
        self._send(call, replica, self.state())

    def credit(self, call: Call, count: int) -> None:
        """The consumer of a stream read ``count`` items: the replica may send that many more."""
        if call.conn is not None and call.state != CallState.DONE:
            call.conn.credit(call.frame_id, count)

    def decode_item(self, call: Call, item: tuple[memoryview, list[bytes] | None]) -> Any:
        try:
            return decode(call.response_codec, *item)
        except Exception as exc:
            raise _decode_error(call, exc) from None

    def fail_all(self, error: BaseException) -> None:
        pending, self._pending = self._pending, []
        for _, call in pending:
            self.finish(call, error=error)


def _decode_error(call: Call, exc: Exception) -> TypeError:
    from serve._serialization import CODEC_NAMES

    return TypeError(
        f"Could not decode the result of {call.method} with the "
        f"{CODEC_NAMES[call.response_codec]} codec: {exc}"
    )
