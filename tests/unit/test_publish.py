"""--publish: the API's schema pattern is the parser's, and they agree on what is valid."""

from __future__ import annotations

import typing

import pytest

from torpor.api.models import PublishSpec
from torpor.errors import InvalidArgument
from torpor.operations.network import PUBLISH_PATTERN, parse_publish


def test_the_api_states_the_parsers_pattern() -> None:
    assert typing.get_args(PublishSpec)[1].pattern == PUBLISH_PATTERN


@pytest.mark.parametrize(("text", "parsed"), [
    ("8080:80", ("127.0.0.1", 8080, 80)),
    ("0.0.0.0:8080:80/tcp", ("0.0.0.0", 8080, 80)),
    ("10.1.2.3:65535:1", ("10.1.2.3", 65535, 1)),
])
def test_valid(text: str, parsed: tuple[str, int, int]) -> None:
    forward = parse_publish(text)
    assert (forward.host_addr, forward.host_port, forward.guest_port) == parsed


@pytest.mark.parametrize("text", ["80", "0:80", "80:65536", "256.1.1.1:80:80", "80:90/udp",
                                  "a:80:80", "[::1]:80:80", "80:90/"])
def test_invalid(text: str) -> None:
    with pytest.raises(InvalidArgument, match="use \\[HOST_IP:\\]HOST_PORT:GUEST_PORT"):
        parse_publish(text)
