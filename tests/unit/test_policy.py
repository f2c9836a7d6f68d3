import pytest

from torpor.codec import Codec, parse_codec, validate_level
from torpor.errors import InvalidArgument
from torpor.instances.metadata import CompressionPolicy, resolve_policy


def test_codec_names_are_case_insensitive() -> None:
    assert parse_codec("ZStd") is Codec.ZSTD and parse_codec(" lz4 ") is Codec.LZ4
    with pytest.raises(InvalidArgument, match="unknown compression"):
        parse_codec("gzip")


@pytest.mark.parametrize(("codec", "level", "expected"), [
    (Codec.ZSTD, None, 1), (Codec.ZSTD, 19, 19), (Codec.ZSTD, -5, -5),
    (Codec.LZ4, None, 0), (Codec.LZ4, 12, 12), (Codec.NONE, None, 0)])
def test_levels(codec: Codec, level: int | None, expected: int) -> None:
    assert validate_level(codec, level) == expected


@pytest.mark.parametrize(("codec", "level"), [
    (Codec.ZSTD, 0), (Codec.ZSTD, 20), (Codec.ZSTD, -100), (Codec.LZ4, 13), (Codec.LZ4, -1),
    (Codec.NONE, 3)])
def test_bad_levels(codec: Codec, level: int) -> None:
    with pytest.raises(InvalidArgument):
        validate_level(codec, level)


def test_precedence_request_instance_default() -> None:
    request = CompressionPolicy(codec=Codec.LZ4)
    instance = CompressionPolicy(codec=Codec.ZSTD, level=3)
    default = CompressionPolicy(codec=Codec.ZSTD)
    assert resolve_policy(request, instance, default) is request
    assert resolve_policy(None, instance, default) is instance
    assert resolve_policy(None, None, default) is default
    assert resolve_policy(None, None, None).codec is Codec.NONE
    disabled = CompressionPolicy(codec=Codec.NONE)  # an explicit "none" beats the default
    assert resolve_policy(disabled, None, default).codec is Codec.NONE
    assert resolve_policy(None, disabled, default).codec is Codec.NONE
