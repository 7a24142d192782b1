"""Framing of the Connect stream: hand-written Batch wrapper, zero-copy bodies."""

from typing import Any

import pytest

from serve._proto.common_pb2 import CODEC_MSGPACK, CODEC_PICKLE
from serve._proto.replica_pb2 import FRAME_KIND_REQUEST, FRAME_KIND_RESULT, Batch, FrameHeader
from serve._rpc.frames import BatchWriter, FrameError, iter_frames, read_frames


def test_batch_is_valid_protobuf_and_round_trips() -> None:
    writer = BatchWriter()
    writer.add(
        FrameHeader(kind=FRAME_KIND_REQUEST, frame_id=1, method="m", args_len=3), b"abc", b"de"
    )
    writer.add(FrameHeader(kind=FRAME_KIND_RESULT, frame_id=2, ongoing=4), b"x" * 300)
    assert writer.count == 2
    (message,) = writer.take()
    assert writer.count == 0
    parsed = Batch.FromString(message)  # what any protobuf peer would see
    assert len(parsed.frames) == len(message) - 3  # tag + 2-byte varint
    frames = list(iter_frames(message))
    assert [(h.kind, h.frame_id) for h, _ in frames] == [
        (FRAME_KIND_REQUEST, 1),
        (FRAME_KIND_RESULT, 2),
    ]
    assert bytes(frames[0][1]) == b"abcde"
    assert frames[0][0].args_len == 3
    assert bytes(frames[1][1]) == b"x" * 300
    assert isinstance(frames[1][1], memoryview)


def test_protobuf_encoded_batch_is_accepted() -> None:
    writer = BatchWriter()
    writer.add(FrameHeader(kind=FRAME_KIND_RESULT, frame_id=7), b"payload")
    inner = Batch.FromString(writer.take()[0]).frames
    assert [h.frame_id for h, _ in iter_frames(Batch(frames=inner).SerializeToString())] == [7]


def test_empty_message_has_no_frames() -> None:
    assert list(iter_frames(b"")) == []


@pytest.mark.parametrize(
    ("message", "text"),
    [
        (b"\x12\x00", "Not a Batch message"),
        (b"\x0a", "Truncated Batch length"),
        (b"\x0a\x05abc", "does not match"),
        (b"\x0a\x03abc", "Truncated frame lengths"),
        (b"\x0a\x08" + b"\xff\x00\x00\x00\x00\x00\x00\x00", "overruns the batch"),
        (
            b"\x0a\x0a" + b"\x02\x00\x00\x00\x00\x00\x00\x00" + b"\xff\xff",
            "Undecodable frame header",
        ),
    ],
)
def test_garbage_is_a_frame_error(message: bytes, text: str) -> None:
    with pytest.raises(FrameError, match=text):
        list(iter_frames(message))


async def test_out_of_band_buffers_follow_their_frame_as_raw_messages() -> None:
    big = b"b" * 1000
    writer = BatchWriter()
    writer.add(FrameHeader(kind=FRAME_KIND_REQUEST, frame_id=1), b"small")
    writer.add(FrameHeader(kind=FRAME_KIND_RESULT, frame_id=2), b"head", buffers=[big, b"cc"])
    writer.add(FrameHeader(kind=FRAME_KIND_RESULT, frame_id=3), b"tail")
    messages = writer.take()
    assert len(messages) == 4
    assert messages[1] is big  # sent as is, never copied into a batch
    queue = iter(messages[1:])

    async def read() -> object:
        return next(queue)

    frames = await read_frames(messages[0], read)
    assert [(h.frame_id, bytes(b), bufs) for h, b, bufs in frames] == [
        (1, b"small", None),
        (2, b"head", [big, b"cc"]),
    ]
    assert [h.frame_id for h, _, _ in await read_frames(next(queue), read)] == [3]


async def test_a_short_or_missing_buffer_is_a_frame_error() -> None:
    writer = BatchWriter()
    writer.add(FrameHeader(kind=FRAME_KIND_RESULT, frame_id=2), b"head", buffers=[b"abc"])
    batch, _ = writer.take()

    async def wrong() -> object:
        return b"ab"

    with pytest.raises(FrameError, match="announced as 3"):
        await read_frames(batch, wrong)

    async def ended() -> object:
        return object()  # grpc.aio.EOF

    with pytest.raises(FrameError, match="ended before"):
        await read_frames(batch, ended)


async def test_big_out_of_band_buffers_travel_in_bounded_chunks() -> None:
    from serve._rpc.frames import CHUNK_BYTES, read_frames

    big = bytes(range(256)) * ((2 * CHUNK_BYTES + 1000) // 256)
    writer = BatchWriter()
    writer.add(FrameHeader(kind=FRAME_KIND_REQUEST, frame_id=7), b"body", buffers=[b"small", big])
    marked = writer.take_marked()
    assert [mark for _, mark in marked] == [0, 0, 0, 0, 7]  # the last chunk completes frame 7
    messages = [m if isinstance(m, bytes) else m.message() for m, _ in marked]
    assert max(len(m) for m in messages[1:]) <= CHUNK_BYTES
    rest = iter(messages[1:])

    async def read() -> object:
        return next(rest)

    ((header, body, buffers),) = await read_frames(messages[0], read)
    assert header.frame_id == 7
    assert bytes(body) == b"body"
    assert buffers == [b"small", big]


async def test_buffers_over_the_threshold_go_in_a_segment_and_stay_in_the_batch() -> None:
    """With a stream's segments set, a frame's buffers of min_bytes or more in all travel
    in one shared-memory segment and the frame stays in its Batch; smaller ones as before."""
    import secrets

    from serve._rpc import shm

    token = secrets.token_hex(16)
    sender = shm.SegmentLane(token, router=True, min_bytes=100)
    receiver = shm.SegmentLane(token, router=False, min_bytes=100)
    writer = BatchWriter()
    writer.segments = sender
    try:
        writer.add(
            FrameHeader(kind=FRAME_KIND_REQUEST, frame_id=1), b"a", buffers=[b"x" * 60, b"y" * 60]
        )
        writer.add(FrameHeader(kind=FRAME_KIND_REQUEST, frame_id=2), b"b", buffers=[b"z" * 99])
        writer.add(FrameHeader(kind=FRAME_KIND_REQUEST, frame_id=3), b"c")
        messages = writer.take()
        assert len(messages) == 3  # frames 1 and 2 in one batch, 2's buffer raw, then 3
        rest = iter(messages[1:])

        async def read() -> object:
            return next(rest)

        frames = await read_frames(messages[0], read, receiver)
        assert [(h.frame_id, h.shm_segment, bufs) for h, _, bufs in frames] == [
            (1, 1, [b"x" * 60, b"y" * 60]),
            (2, 0, [b"z" * 99]),
        ]
        assert [h.frame_id for h, _, _ in await read_frames(next(rest), read, receiver)] == [3]
        assert shm.sweep(token) == 0  # the receiver removed the segment as it opened it
        writer.add(FrameHeader(kind=FRAME_KIND_REQUEST, frame_id=4), buffers=[b"q" * 200])
        stray = writer.take()[0]
        with pytest.raises(FrameError, match="without them"):  # a stream without a handshake
            await read_frames(stray, read)
    finally:
        shm.sweep(token)


def test_hand_serialized_headers_parse_as_the_frame_headers_they_stand_for() -> None:
    from serve._proto.replica_pb2 import FRAME_KIND_END, FRAME_KIND_ITEM
    from serve._rpc.frames import item_header, outcome_header, request_header

    options = ("say_hi", 1, 2, "model-7", True, False, 64, 16 * 1024 * 1024)
    cases: list[tuple[int, dict[str, Any]]] = [
        (1, {}),
        (300, {"args_len": 17, "args_buffer_count": 2, "timeout_s": 1.5, "reserved": True}),
        (2**40, {"args_len": 2**20, "trace_context": {"traceparent": "00-ab-cd-01"}}),
    ]
    for frame_id, extra in cases:
        fields: dict[str, Any] = {"args_len": 0, **extra}
        encoded = request_header(frame_id, options, request_id="r" * 32, **fields)
        expected = FrameHeader(
            kind=FRAME_KIND_REQUEST,
            frame_id=frame_id,
            method="say_hi",
            request_codec=CODEC_PICKLE,
            response_codec=CODEC_MSGPACK,
            model_id="model-7",
            stream=True,
            stream_window=64,
            stream_window_bytes=16 * 1024 * 1024,
            request_id="r" * 32,
            **fields,
        )
        assert FrameHeader.FromString(encoded) == expected
    assert FrameHeader.FromString(outcome_header(5, 0, 5)) == FrameHeader(
        kind=FRAME_KIND_RESULT, frame_id=5, acked=5
    )
    assert FrameHeader.FromString(outcome_header(2**33, 900, 2**33, end=True)) == FrameHeader(
        kind=FRAME_KIND_END, frame_id=2**33, ongoing=900, acked=2**33
    )
    assert FrameHeader.FromString(item_header(129)) == FrameHeader(
        kind=FRAME_KIND_ITEM, frame_id=129
    )
