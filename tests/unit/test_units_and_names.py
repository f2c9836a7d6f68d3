import pytest
from hypothesis import given
from hypothesis import strategies as st

from torpor.errors import InvalidArgument
from torpor.instances.metadata import new_instance_id, new_mac, validate_name
from torpor.units import parse_duration, parse_size


@pytest.mark.parametrize(("text", "expected"), [
    ("512M", 512 << 20), ("2G", 2 << 30), ("1.5GiB", 3 << 29), ("4096", 4096),
    ("64 mib", 64 << 20), ("1t", 1 << 40),
])
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_parse_size_default_unit() -> None:
    assert parse_size("512", "M") == 512 << 20


@pytest.mark.parametrize("text", ["", "M", "12X", "-1G", "1..2G", "ten"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_size(text)


def test_parse_duration() -> None:
    assert parse_duration("30s") == 30
    assert parse_duration("5m") == 300
    assert parse_duration("250ms") == pytest.approx(0.25)
    with pytest.raises(InvalidArgument):
        parse_duration("soon")


@pytest.mark.parametrize("name", ["a", "vm-1", "x" * 63, "0abc", "a-b-c"])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "A", "-a", "a-", "a_b", "a.b", "x" * 64, "../x", "a/b",
                                  "é", "vm\n", "vm\n1"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(InvalidArgument):
        validate_name(name)


@given(st.text(max_size=80))
def test_any_accepted_name_is_one_safe_path_component(name: str) -> None:
    try:
        validate_name(name)
    except InvalidArgument:
        return
    assert "/" not in name and name not in (".", "..") and len(name) <= 63
    assert name.isascii() and name.isprintable()


def test_ids_and_macs_are_unique_and_well_formed() -> None:
    ids = {new_instance_id() for _ in range(200)}
    assert len(ids) == 200 and all(len(i) == 12 and i.isalnum() for i in ids)
    mac = new_mac()
    assert mac.startswith("52:54:00:") and len(mac.split(":")) == 6
