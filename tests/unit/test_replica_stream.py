"""The replica's wire edge hands a REQUEST frame on as plain data, every field intact."""

from __future__ import annotations

import asyncio
import dataclasses

from serve._proto.replica_pb2 import FRAME_KIND_REQUEST, FrameHeader
from serve._rpc.replica_stream import ErrorKind, ErrorReply, IncomingRequest, _request


def test_a_request_frame_becomes_an_incoming_request_with_every_field() -> None:
    header = FrameHeader(
        kind=FRAME_KIND_REQUEST,
        frame_id=7,
        method="predict",
        request_id="req-1",
        model_id="model-a",
        request_codec=2,  # type: ignore[arg-type]
        response_codec=3,  # type: ignore[arg-type]
        stream=True,
        stream_window=5,
        stream_window_bytes=1024,
        timeout_s=1.5,
        reserved=True,
        no_reject=True,
        trace_context={"traceparent": "00-abc"},
        args_len=3,
        args_buffer_count=1,
    )
    body = memoryview(b"argkwargs")
    incoming = _request(header, body, [b"buffer"])
    fields = {f.name: getattr(incoming, f.name) for f in dataclasses.fields(incoming)}
    assert fields | {"body": None} == {
        "frame_id": 7,
        "method": "predict",
        "request_id": "req-1",
        "model_id": "model-a",
        "request_codec": 2,
        "response_codec": 3,
        "stream": True,
        "stream_window": 5,
        "stream_window_bytes": 1024,
        "timeout_s": 1.5,
        "reserved": True,
        "no_reject": True,
        "trace_context": {"traceparent": "00-abc"},
        "body": None,
        "args_len": 3,
        "args_buffer_count": 1,
        "buffers": [b"buffer"],
    }
    assert incoming.body is body
    assert type(incoming.trace_context) is dict  # not a protobuf container
    assert {f.name for f in dataclasses.fields(IncomingRequest)} <= {
        f.name for f in FrameHeader.DESCRIPTOR.fields
    } | {"body", "buffers"}


def test_a_request_without_trace_context_shares_one_empty_mapping() -> None:
    incoming = _request(FrameHeader(kind=FRAME_KIND_REQUEST, frame_id=1), memoryview(b""), None)
    assert dict(incoming.trace_context) == {}
    assert incoming.buffers is None


def test_an_error_reply_describes_the_exception_and_a_cancellation_has_no_traceback() -> None:
    try:
        raise ValueError("bad input")
    except ValueError as exc:
        error = ErrorReply.of(exc, ErrorKind.USER)
    assert (error.kind, error.type_name, error.message) == (
        ErrorKind.USER,
        "ValueError",
        "bad input",
    )
    assert "Traceback" in error.traceback
    assert error.pickled
    cancelled = ErrorReply.of(asyncio.CancelledError(), ErrorKind.CANCELLED)
    assert cancelled.traceback == ""
