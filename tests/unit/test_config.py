"""Config: TOML file, environment over it, flags over both; every bad value is a clear
InvalidArgument naming where it came from."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from torpor.api.listen import find_daemon, parse_listen
from torpor.codec import Codec
from torpor.config import Config, load_config
from torpor.errors import InvalidArgument
from torpor.settings import SETTINGS, setting


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "torpor.toml"
    path.write_text(text)
    return path


def test_defaults_derive_socket_and_token_from_the_data_root(tmp_path: Path) -> None:
    config = load_config(overrides={"data_root": tmp_path}, environ={})
    assert str(config.listen_address) == f"unix:{tmp_path}/torpord.sock"
    assert config.token_path == tmp_path / "api-token"
    assert config.settings().default_compression is None


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    path = write(tmp_path, f'''
data_root = "{tmp_path}/from-file"
listen = "127.0.0.1:7300"
accel = "tcg"
[compression]
default = "zstd:3"
mode = "background"
delay = "30s"
jobs = 3
rate_limit = "100M"
''')
    config = load_config(path, environ={})
    settings = config.settings()
    policy = settings.default_compression
    assert policy is not None
    assert (policy.codec, policy.level, policy.mode, policy.delay_s) == (
        Codec.ZSTD, 3, "background", 30.0)
    assert (settings.compression_jobs, settings.compression_rate_limit) == (3, 100 << 20)
    assert (config.listen_address.host, config.listen_address.port) == ("127.0.0.1", 7300)

    env = {"TORPOR_ACCEL": "kvm", "TORPOR_DEFAULT_COMPRESSION": "lz4",
           "TORPOR_DATA_ROOT": str(tmp_path / "from-env")}
    config = load_config(path, environ=env)
    assert config.accel == "kvm" and config.data_root == tmp_path / "from-env"
    assert config.settings().default_compression.codec is Codec.LZ4  # type: ignore[union-attr]
    config = load_config(path, environ=env, overrides={"accel": "tcg", "data_root": None})
    assert config.accel == "tcg" and config.data_root == tmp_path / "from-env"


def test_config_file_found_through_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, 'accel = "tcg"\n')
    assert load_config(environ={"TORPOR_CONFIG": str(path)}).accel == "tcg"


@pytest.mark.parametrize(("text", "message"), [
    ('accel = "fast"', "accel"),
    ('listen = "nowhere"', "neither unix:PATH nor HOST:PORT"),
    ('bogus = 1', "bogus"),
    ('[compression]\ndefault = "gzip"', "unknown compression 'gzip'"),
    ('[compression]\ndefault = "zstd:99"', "level"),
    ('[compression]\ndefault = "zstd:x"', "must be a number"),
    ('[compression]\njobs = 0', "compression.jobs"),
    ('[compression]\nrate_limit = "fast"', "not a size"),
    ('[compression]\ndelay = "soon"', "not a duration"),
    ('data_root = [', "config"),
])
def test_bad_values_are_clear_errors(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(InvalidArgument, match=message) as err:
        load_config(path, environ={})
    assert str(path) in err.value.message


def test_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="TORPOR_COMPRESSION_JOBS"):
        load_config(environ={"TORPOR_COMPRESSION_JOBS": "-2"})


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="does not exist"):
        load_config(tmp_path / "nope.toml", environ={})


def test_listen_addresses() -> None:
    assert parse_listen("unix:/run/t.sock").unix_path == Path("/run/t.sock")
    v6 = parse_listen("[::1]:8080")
    assert (v6.host, v6.port) == ("::1", 8080)
    for bad in ("unix:", "host:0", "host:99999", ":80"):
        with pytest.raises(InvalidArgument):
            parse_listen(bad)


def test_the_cli_does_not_import_the_server_stack() -> None:
    """Every CLI command asks whether a daemon listens; that must not cost the import of
    uvicorn and FastAPI (~0.2 s), which only `torpor serve` needs, nor of pydantic,
    asyncio or httpx (~0.15 s), which a call through the daemon does without."""
    import subprocess
    import sys

    heavy = ("fastapi", "uvicorn", "starlette", "pydantic", "asyncio", "httpx")
    code = ("import sys, torpor.cli.main; "
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"


# A value each setting accepts from the environment, and what it becomes.
ENV_VALUES = {
    "data_root": ("/srv/torpor", Path("/srv/torpor")),
    "listen": ("127.0.0.1:7300", "127.0.0.1:7300"),
    "accel": ("tcg", "tcg"),
    "token_file": ("/srv/token", Path("/srv/token")),
    "compression.default": ("zstd", "zstd"),
    "compression.level": ("7", 7),
    "compression.mode": ("background", "background"),
    "compression.delay": ("30s", "30s"),
    "compression.jobs": ("3", 3),
    "compression.rate_limit": ("50M", "50M"),
    "compression.memory_file_delay": ("1m", "1m"),
    "auto_standby": ("5m", "5m"),
    "auto_standby_cpu": ("0.5", 0.5),
    "restore_pool": ("2", 2),
    "network.default": ("bridge", "bridge"),
    "network.bridge": ("tb0", "tb0"),
    "network.subnet": ("10.99.0.0/28", "10.99.0.0/28"),
    "network.nat": ("false", False),
    "network.dns": ("127.0.0.1#5353, 192.0.2.53", "127.0.0.1#5353, 192.0.2.53"),
}


def test_every_setting_is_set_by_its_environment_variable() -> None:
    keys = {s.key for s in SETTINGS}
    assert keys == set(ENV_VALUES)  # a new setting gets a row here
    environ = {setting(key).env: text for key, (text, _) in ENV_VALUES.items()}
    config = load_config(environ=environ).model_dump()
    for key, (_, expected) in ENV_VALUES.items():
        value = config
        for part in key.split("."):
            value = value[part]
        assert value == expected, key


def test_every_environment_variable_is_documented() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert [s.env for s in SETTINGS if s.env not in readme] == []


def leaves(model: type[BaseModel], prefix: str = "") -> set[str]:
    found = set()
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            found |= leaves(field.annotation, f"{prefix}{name}.")
        else:
            found.add(prefix + name)
    return found


def test_the_model_validates_exactly_the_declared_settings() -> None:
    assert leaves(Config) == {s.key for s in SETTINGS}


@pytest.mark.parametrize("where", ["defaults", "file", "environment", "flag"])
def test_the_client_finds_the_daemon_where_the_config_says(tmp_path: Path, where: str) -> None:
    """find_daemon (no pydantic) and load_config agree on the address and the token."""
    path, environ, flag = None, {}, None
    if where == "file":
        path = tmp_path / "t.toml"
        path.write_text(f'data_root = "{tmp_path}/a"\nlisten = "127.0.0.1:7301"\n'
                        f'token_file = "{tmp_path}/tok"\n')
    elif where == "environment":
        environ = {"TORPOR_DATA_ROOT": str(tmp_path / "b"), "TORPOR_TOKEN_FILE": "/x/tok"}
    elif where == "flag":
        flag = tmp_path / "c"
    config = load_config(path, overrides={"data_root": flag}, environ=environ)
    found = find_daemon(path, flag, environ)
    assert found is not None
    assert (found.listen, found.token_file) == (config.listen_address, config.token_path)


def test_a_malformed_config_leaves_the_finding_to_the_full_config(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('listen = "nowhere"\n')
    assert find_daemon(path, None, {}) is None
    with pytest.raises(InvalidArgument, match="listen"):
        load_config(path, environ={})
