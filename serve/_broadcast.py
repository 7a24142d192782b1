"""``handle.broadcast()``: one call to every replica of the set known at call time."""

from __future__ import annotations

import asyncio
from typing import Any

from serve._options import HandleOptions
from serve._request import Request
from serve._router import ReplicaSkipped, Router
from serve._sync import Completion, post
from serve.exceptions import DeploymentUnavailableError


def start_broadcast(
    router: Router, options: HandleOptions, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Completion:
    """Start the broadcast; the completion holds its calls once they are all sent."""
    template = Request(-1, options, args, kwargs, parent=None, on_cancel=router.cancel)
    done = Completion()
    post(_begin, router, template, done)
    return done


def _begin(router: Router, template: Request, done: Completion) -> None:
    state = router.state()
    if state.replica_set is None:
        task = asyncio.get_running_loop().create_task(
            state.wait_ready(), name=f"broadcast:wait:{router.deployment_id}"
        )
        task.add_done_callback(lambda _: _begin(router, template, done))
        return
    if template.inputs:
        inputs = [upstream.completion for _, upstream in template.inputs]
        pending = [c for c in inputs if not c.done()]
        if pending:
            pending[0].add_done_callback(lambda _: _begin(router, template, done))
            return
        for completion in inputs:
            error = completion.error()
            if error is not None:
                done.set_exception(error)
                return
        try:
            template.encode(*template.resolved_arguments())
        except Exception as exc:
            done.set_exception(exc)
            return
        template.inputs = None
    replicas = list(state.routable)
    if not replicas:
        done.set_exception(
            DeploymentUnavailableError(str(router.deployment_id), "it has no running replicas.")
        )
        return
    requests = []
    for replica in replicas:
        request = template.copy_for_broadcast()
        router.send_to(request, replica)
        requests.append(request)
    done.set_result((router.deployment_id, requests))


def _outcomes(deployment: object, calls: list[Request], return_exceptions: bool) -> list[Any]:
    results = []
    reached = 0
    for call in calls:
        error = call.completion.error()
        if isinstance(error, ReplicaSkipped):
            continue
        reached += 1
        if error is not None:
            if not return_exceptions:
                raise error
            results.append(error)
        else:
            results.append(call.completion.outcome())
    if not reached and calls:
        raise DeploymentUnavailableError(str(deployment), "no replica could be reached.")
    return results


def gather_sync(done: Completion, timeout_s: float | None, return_exceptions: bool) -> list[Any]:
    import time

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    deployment, calls = done.wait_sync(timeout_s)
    for call in calls:
        remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        try:
            call.completion.wait_sync(remaining)
        except TimeoutError as exc:
            raise TimeoutError(
                f"Timed out after {timeout_s}s waiting for {len(calls)} broadcast results."
            ) from exc
        except Exception:
            pass
    return _outcomes(deployment, calls, return_exceptions)


async def gather_async(
    done: Completion, timeout_s: float | None, return_exceptions: bool
) -> list[Any]:
    try:
        async with asyncio.timeout(timeout_s):
            deployment, calls = await done.wait()
            for call in calls:
                try:
                    await call.completion.wait()
                except Exception:
                    pass
    except TimeoutError as exc:
        raise TimeoutError(f"Timed out after {timeout_s}s waiting for broadcast results.") from exc
    return _outcomes(deployment, calls, return_exceptions)
