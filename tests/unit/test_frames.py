"""Framing of the Connect stream: hand-written Batch wrapper, zero-copy bodies."""

import pytest

from serve._proto.replica_pb2 import FRAME_KIND_REQUEST, FRAME_KIND_RESULT, Batch, FrameHeader
from serve._rpc.frames import BatchWriter, FrameError, iter_frames


def test_batch_is_valid_protobuf_and_round_trips() -> None:
    writer = BatchWriter()
    writer.add(FrameHeader(kind=FRAME_KIND_REQUEST, id=1, method="m", args_len=3), b"abc", b"de")
    writer.add(FrameHeader(kind=FRAME_KIND_RESULT, id=2, ongoing=4), b"x" * 300)
    assert writer.count == 2
    message = writer.take()
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
    inner = Batch.FromString(writer.take()).frames
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
