"""The four payload codecs."""

import pickle
import threading

import pytest

from serve._serialization import (
    CODEC_IDS,
    OOB_MIN_BYTES,
    EncodedArgs,
    decode,
    decode_args,
    encode,
    encode_args,
    encode_buffers,
)


@pytest.mark.parametrize("codec", list(CODEC_IDS))
def test_plain_data_round_trips(codec: str) -> None:
    cid = CODEC_IDS[codec]
    value = {"a": [1, 2.5, "x", None, True], "b": {"c": "d"}}
    assert decode(cid, encode(cid, value)) == value


def test_tuples_become_lists_in_msgpack_and_orjson() -> None:
    for codec in ("msgpack", "orjson"):
        cid = CODEC_IDS[codec]
        assert decode(cid, encode(cid, (1, 2))) == [1, 2]
    for codec in ("cloudpickle", "pickle"):
        cid = CODEC_IDS[codec]
        assert decode(cid, encode(cid, (1, 2))) == (1, 2)


def test_bytes_round_trip_in_msgpack() -> None:
    cid = CODEC_IDS["msgpack"]
    assert decode(cid, encode(cid, b"\x00\xff")) == b"\x00\xff"


@pytest.mark.parametrize("codec", list(CODEC_IDS))
def test_unencodable_values_raise_type_error_naming_codec_and_type(codec: str) -> None:
    with pytest.raises(TypeError) as info:
        encode(CODEC_IDS[codec], threading.Lock())
    assert codec in str(info.value)
    assert "lock" in str(info.value)


def test_orjson_refuses_bytes() -> None:
    with pytest.raises(TypeError, match="orjson codec cannot encode a value of type bytes"):
        encode(CODEC_IDS["orjson"], b"x")


def test_cloudpickle_carries_local_functions() -> None:
    def local(x: int) -> int:
        return x + 1

    cid = CODEC_IDS["cloudpickle"]
    assert decode(cid, encode(cid, local))(1) == 2
    with pytest.raises(TypeError, match="pickle codec cannot encode"):
        encode(CODEC_IDS["pickle"], local)


@pytest.mark.parametrize("codec", list(CODEC_IDS))
def test_args_and_kwargs_are_separate(codec: str) -> None:
    cid = CODEC_IDS[codec]
    args, kwargs = encode_args(cid, (1, "a"), {"k": 2})
    decoded_args, decoded_kwargs = decode_args(cid, memoryview(args), memoryview(kwargs))
    assert list(decoded_args) == [1, "a"]
    assert decoded_kwargs == {"k": 2}
    assert encode_args(cid, (), {}) == (b"", b"")


def test_malformed_args_payload() -> None:
    cid = CODEC_IDS["pickle"]
    with pytest.raises(TypeError, match="Malformed request payload"):
        decode_args(cid, pickle.dumps(3), b"")


@pytest.mark.parametrize("codec", ["cloudpickle", "pickle"])
def test_big_bytes_travel_out_of_band_without_copies(codec: str) -> None:
    cid = CODEC_IDS[codec]
    big = b"x" * (OOB_MIN_BYTES + 1)
    small = b"y" * 10
    data, buffers = encode_buffers(cid, (big, small))
    assert buffers == [big]
    assert buffers[0] is big
    assert len(data) < 1000
    value = decode(cid, data, buffers)
    assert value[0] is big  # the receiver gets the very buffer it was handed
    assert value[1] == small


def test_msgpack_and_orjson_keep_everything_in_band() -> None:
    data, buffers = encode_buffers(CODEC_IDS["msgpack"], b"z" * (OOB_MIN_BYTES + 1))
    assert buffers == []
    assert len(data) > OOB_MIN_BYTES


def test_args_with_big_buffers_split_between_args_and_kwargs() -> None:
    cid = CODEC_IDS["cloudpickle"]
    big_a, big_k = b"a" * OOB_MIN_BYTES, b"k" * OOB_MIN_BYTES
    encoded = EncodedArgs(cid, (big_a,), {"k": big_k})
    assert encoded.args_buffer_count == 1
    assert len(encoded.buffers) == 2
    args, kwargs = decode_args(
        cid, encoded.args, encoded.kwargs, encoded.buffers, encoded.args_buffer_count
    )
    assert args[0] is big_a
    assert kwargs["k"] is big_k
