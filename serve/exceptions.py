"""Exceptions raised by the serve SDK.

The tree::

    ServeError                          base class (alias: RayServeException)
    ├── BackPressureError               a handle's queue is full (max_queued_requests)
    ├── RequestCancelledError           the request was cancelled by response.cancel()
    ├── RequestTimeoutError             the deadline it inherited passed (also TimeoutError)
    ├── DeploymentUnavailableError      the deployment does not exist or has no replicas to call
    ├── DeploymentFailedError           serve.run() could not start an application (a RuntimeError)
    ├── ReplicaDiedError                the replica died after it had admitted the request
    ├── ReplicaUnavailableError         the replica chosen by choose_replica() is gone
    ├── ControllerUnavailableError      no controller answered (also ConnectionError)
    └── RemoteError                     a remote exception that could not be rebuilt locally

User exceptions are re-raised as their own type; the remote traceback is attached as
``__cause__`` (a :class:`RemoteTraceback`).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BackPressureError",
    "ControllerUnavailableError",
    "DeploymentFailedError",
    "DeploymentUnavailableError",
    "RayServeException",
    "RemoteError",
    "RemoteTraceback",
    "ReplicaDiedError",
    "ReplicaUnavailableError",
    "RequestCancelledError",
    "RequestTimeoutError",
    "ServeError",
]


class ServeError(Exception):
    """Base class of every error the serve SDK raises on its own behalf."""


RayServeException = ServeError


class BackPressureError(ServeError):
    """The handle already holds ``max_queued_requests`` requests waiting for a replica.

    The caller should retry later, or raise the deployment's ``max_queued_requests``. Over
    HTTP it is answered ``status_code`` (503, or 429 by the deployment's
    ``backpressure_config``), with a ``Retry-After`` header when ``retry_after_s`` is set.
    """

    def __init__(
        self,
        num_queued_requests: int,
        max_queued_requests: int,
        status_code: int = 503,
        retry_after_s: float | None = None,
        *,
        deployment: str = "",
    ) -> None:
        self.num_queued_requests = num_queued_requests
        self.max_queued_requests = max_queued_requests
        self.status_code = status_code
        self.retry_after_s = retry_after_s
        self.deployment = deployment
        where = (
            f" Retry later, or raise max_queued_requests of '{deployment}'." if deployment else ""
        )
        # Ray's text first: clients match on it.
        super().__init__(
            f"Request dropped due to backpressure (num_queued_requests={num_queued_requests}, "
            f"max_queued_requests={max_queued_requests}).{where}"
        )

    @property
    def message(self) -> str:
        return str(self)

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_backpressure,
            (
                self.num_queued_requests,
                self.max_queued_requests,
                self.deployment,
                self.status_code,
                self.retry_after_s,
            ),
        )


def _rebuild_backpressure(
    queued: int,
    limit: int,
    deployment: str,
    status_code: int = 503,
    retry_after_s: float | None = None,
) -> BackPressureError:
    return BackPressureError(queued, limit, status_code, retry_after_s, deployment=deployment)


class RequestCancelledError(ServeError):
    """The request was cancelled with ``response.cancel()`` (or its parent request was)."""

    def __init__(self, request_id: str | None = None) -> None:
        self.request_id = request_id
        super().__init__(f"Request {request_id} was cancelled.")

    def __reduce__(self) -> tuple[Any, ...]:
        return (RequestCancelledError, (self.request_id,))


class RequestTimeoutError(ServeError, TimeoutError):
    """The deadline of the request this one serves passed before it finished.

    A deadline is set where a request enters the system (an HTTP ``request_timeout_s``, or the
    deadline a gRPC client set) and travels with every nested handle call made while serving it:
    such a call fails at once once the deadline has passed, a call waiting for a replica fails
    when it passes, and the replica cancels the work. Nothing is retried past the deadline.
    Whoever set the deadline must allow more time, or the deployment must answer faster.
    ``timeout_s`` is the time the request had left when it was made (0 if none).
    """

    def __init__(self, *, deployment: str = "", method: str = "", timeout_s: float = 0.0) -> None:
        self.deployment = deployment
        self.method = method
        self.timeout_s = timeout_s
        where = f" to '{deployment}'" if deployment else ""
        if method:
            where += f" ({method})"
        if timeout_s > 0:
            what = f"timed out after {timeout_s:.3g}s (the time it had left before its deadline)"
        else:
            what = "timed out: its deadline had already passed when it was made"
        super().__init__(
            f"Request{where} {what}. The deadline comes from the request it serves (an ingress "
            "request's timeout); allow more time there, or make the deployment answer faster."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_timeout, (self.deployment, self.method, self.timeout_s))


def _rebuild_timeout(deployment: str, method: str, timeout_s: float) -> RequestTimeoutError:
    return RequestTimeoutError(deployment=deployment, method=method, timeout_s=timeout_s)


class DeploymentUnavailableError(ServeError):
    """The deployment cannot take requests: it does not exist, or was deleted."""

    def __init__(self, deployment_id: str, reason: str = "") -> None:
        self.deployment_id = deployment_id
        self.reason = reason
        text = f"Deployment '{deployment_id}' is unavailable"
        super().__init__(f"{text}: {reason}" if reason else f"{text}.")

    def __reduce__(self) -> tuple[Any, ...]:
        return (DeploymentUnavailableError, (self.deployment_id, self.reason))


class DeploymentFailedError(ServeError, RuntimeError):
    """An application could not be deployed; the message carries the replica's traceback."""


class ReplicaDiedError(ServeError):
    """The replica died after admitting the request; the request may have partly run.

    Serve never re-runs such a request on its own: retry it yourself if it is idempotent.
    """


class ReplicaUnavailableError(ServeError):
    """The replica a ``choose_replica()`` selection holds a slot on is gone by ``dispatch()``
    time (it died, or its connection broke); the request did not run. Choose again."""


class ControllerUnavailableError(ServeError, ConnectionError):
    """No serve-controller answered at the configured address."""


class RemoteError(ServeError):
    """A remote exception that could not be rebuilt here (unpicklable, or its class is unknown).

    It carries the remote type name, message and formatted traceback.
    """

    def __init__(self, type_name: str, message: str, traceback: str = "") -> None:
        self.type_name = type_name
        self.message = message
        self.traceback = traceback
        super().__init__(f"{type_name}: {message}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (RemoteError, (self.type_name, self.message, self.traceback))


class RemoteTraceback(Exception):
    """The traceback of an exception raised in another process; only used as ``__cause__``."""

    def __init__(self, traceback: str) -> None:
        self.traceback = traceback
        super().__init__(traceback)

    def __str__(self) -> str:
        return f"\n\nRemote traceback:\n{self.traceback.rstrip()}"
