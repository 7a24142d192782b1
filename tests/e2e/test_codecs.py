"""The four serialization formats through real daemons, each direction independent."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import serve
from serve.handle import DeploymentHandle

# One application serves the whole module (serve_instance would delete it after each test).
pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("serve_session")]

CODECS = ["cloudpickle", "pickle", "msgpack", "orjson"]


class Problem(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@serve.deployment(num_replicas=2)
class Codec:
    def echo(self, *args: Any, **kwargs: Any) -> Any:
        return {"args": list(args), "kwargs": kwargs}

    def value(self, value: Any) -> Any:
        return value

    def tuple_back(self) -> tuple[int, int]:
        return (1, 2)

    async def items(self, n: int) -> Any:
        for i in range(n):
            yield {"i": i}

    def lock(self) -> Any:
        return threading.Lock()

    def fail(self, code: int) -> None:
        raise Problem(code)


@pytest.fixture(scope="module")
def codec_app(serve_session: None) -> Iterator[DeploymentHandle[Any]]:
    handle = serve.run(Codec.bind(), name="codecs", route_prefix=None)
    yield handle
    serve.delete("codecs")


def _handle(app: DeploymentHandle[Any], request: str, response: str) -> DeploymentHandle[Any]:
    return app.options(request_serialization=request, response_serialization=response)


@pytest.mark.parametrize("request_codec", CODECS)
@pytest.mark.parametrize("response_codec", CODECS)
def test_unary_round_trip_each_direction_independent(
    codec_app: DeploymentHandle[Any], request_codec: str, response_codec: str
) -> None:
    h = _handle(codec_app, request_codec, response_codec)
    assert h.echo.remote(1, "a", 2.5, None, k={"x": [1, 2]}).result() == {
        "args": [1, "a", 2.5, None],
        "kwargs": {"k": {"x": [1, 2]}},
    }


@pytest.mark.parametrize("codec", CODECS)
def test_streaming_and_broadcast(codec_app: DeploymentHandle[Any], codec: str) -> None:
    h = _handle(codec_app, codec, codec)
    assert list(h.options(stream=True).items.remote(100)) == [{"i": i} for i in range(100)]
    assert h.broadcast("value", {"k": "v"}).results() == [{"k": "v"}, {"k": "v"}]


def test_tuples_come_back_as_lists_in_msgpack_and_orjson(codec_app: DeploymentHandle[Any]) -> None:
    assert _handle(codec_app, "msgpack", "msgpack").tuple_back.remote().result() == [1, 2]
    assert _handle(codec_app, "orjson", "orjson").tuple_back.remote().result() == [1, 2]
    assert _handle(codec_app, "pickle", "pickle").tuple_back.remote().result() == (1, 2)


def test_bytes_round_trip_through_msgpack(codec_app: DeploymentHandle[Any]) -> None:
    h = _handle(codec_app, "msgpack", "msgpack")
    assert h.value.remote(b"\x00\x01\xff").result() == b"\x00\x01\xff"


@pytest.mark.parametrize("codec", ["msgpack", "orjson"])
def test_unencodable_arguments_fail_in_the_caller_and_the_handle_stays_usable(
    codec_app: DeploymentHandle[Any], codec: str
) -> None:
    h = _handle(codec_app, codec, codec)
    with pytest.raises(TypeError, match=f"The {codec} codec cannot encode a value of type lock"):
        h.value.remote(threading.Lock())
    assert h.value.remote("fine").result() == "fine"


@pytest.mark.parametrize("codec", CODECS)
def test_unencodable_results_fail_in_the_replica_and_it_stays_usable(
    codec_app: DeploymentHandle[Any], codec: str
) -> None:
    h = _handle(codec_app, "cloudpickle", codec)
    with pytest.raises(TypeError, match=f"The {codec} codec cannot encode a value of type lock"):
        h.lock.remote().result()
    assert h.value.remote("fine").result() == "fine"


@pytest.mark.parametrize("codec", CODECS)
def test_user_exceptions_arrive_intact_whatever_the_codec(
    codec_app: DeploymentHandle[Any], codec: str
) -> None:
    with pytest.raises(Problem) as info:
        _handle(codec_app, codec, codec).fail.remote(42).result()
    assert info.value.code == 42


@pytest.mark.parametrize("codec", ["cloudpickle", "pickle", "msgpack"])
def test_ten_mib_payloads(codec_app: DeploymentHandle[Any], codec: str) -> None:
    payload = bytes(range(256)) * (10 * 1024 * 1024 // 256)
    assert _handle(codec_app, codec, codec).value.remote(payload).result() == payload


def test_ten_mib_orjson_payload(codec_app: DeploymentHandle[Any]) -> None:
    payload = "x" * (10 * 1024 * 1024)
    assert _handle(codec_app, "orjson", "orjson").value.remote(payload).result() == payload


def test_codecs_from_inside_a_deployment(codec_app: DeploymentHandle[Any]) -> None:
    @serve.deployment
    class Caller:
        def __init__(self, target: Any) -> None:
            self._target = target.options(
                request_serialization="msgpack", response_serialization="orjson"
            )

        async def __call__(self) -> Any:
            return await self._target.tuple_back.remote()

    assert serve.run(Caller.bind(Codec.bind()), name="codec-caller").remote().result() == [1, 2]
    serve.delete("codec-caller")

    async def from_a_loop() -> Any:
        return await _handle(codec_app, "orjson", "msgpack").value.remote({"k": 1})

    assert asyncio.run(from_a_loop()) == {"k": 1}
