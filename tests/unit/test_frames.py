"""Framing of the Connect stream: hand-written Batch wrapper, zero-copy bodies."""

import pytest

from serve._proto.replica_pb2 import FRAME_KIND_REQUEST, FRAME_KIND_RESULT, Batch, FrameHeader
from serve._rpc.frames import BatchWriter, FrameError, iter_frames, read_frames


def test_batch_is_valid_protobuf_and_round_trips() -> None:
    writer = BatchWriter()
    writer.add(FrameHeader(kind=FRAME_KIND_REQUEST, id=1, method="m", args_len=3), b"abc", b"de")
    writer.add(FrameHeader(kind=FRAME_KIND_RESULT, id=2, ongoing=4), b"x" * 300)
    assert writer.count == 2
    (message,) = writer.take()
    assert writer.count == 0
    parsed = Batch.FromString(message)  # what any protobuf peer would see
    assert len(parsed.frames) == len(message) - 3  # tag + 2-byte varint
    frames = list(iter_frames(message))
    assert [(h.kind, h.id) for h, _ in frames] == [(FRAME_KIND_REQUEST, 1), (FRAME_KIND_RESULT, 2)]
    assert bytes(frames[0][1]) == b"abcde"
    assert frames[0][0].args_len == 3
    assert bytes(frames[1][1]) == b"x" * 300
    assert isinstance(frames[1][1], memoryview)


def test_protobuf_encoded_batch_is_accepted() -> None:
    writer = BatchWriter()
    writer.add(FrameHeader(kind=FRAME_KIND_RESULT, id=7), b"payload")
    inner = Batch.FromString(writer.take()[0]).frames
    assert [h.id for h, _ in iter_frames(Batch(frames=inner).SerializeToString())] == [7]


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
    writer.add(FrameHeader(kind=FRAME_KIND_REQUEST, id=1), b"small")
    writer.add(FrameHeader(kind=FRAME_KIND_RESULT, id=2), b"head", buffers=[big, b"cc"])
    writer.add(FrameHeader(kind=FRAME_KIND_RESULT, id=3), b"tail")
    messages = writer.take()
    assert len(messages) == 4
    assert messages[1] is big  # sent as is, never copied into a batch
    queue = iter(messages[1:])

    async def read() -> object:
        return next(queue)

    frames = await read_frames(messages[0], read)
    assert [(h.id, bytes(b), bufs) for h, b, bufs in frames] == [
        (1, b"small", None),
        (2, b"head", [big, b"cc"]),
    ]
    assert [h.id for h, _, _ in await read_frames(next(queue), read)] == [3]


async def test_a_short_or_missing_buffer_is_a_frame_error() -> None:
    writer = BatchWriter()
    writer.add(FrameHeader(kind=FRAME_KIND_RESULT, id=2), b"head", buffers=[b"abc"])
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
    writer.add(FrameHeader(kind=FRAME_KIND_REQUEST, id=7), b"body", buffers=[b"small", big])
    marked = writer.take_marked()
    assert [mark for _, mark in marked] == [0, 0, 0, 0, 7]  # the last chunk completes frame 7
    messages = [m if isinstance(m, bytes) else m.message() for m, _ in marked]
    assert max(len(m) for m in messages[1:]) <= CHUNK_BYTES
    rest = iter(messages[1:])

    async def read() -> object:
        return next(rest)

    ((header, body, buffers),) = await read_frames(messages[0], read)
    assert header.id == 7
    assert bytes(body) == b"body"
    assert buffers == [b"small", big]
