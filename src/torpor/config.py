"""torpor's configuration: one TOML file, environment variables over it, flags over both.

    data_root = "/var/lib/torpor"
    listen = "unix:/var/lib/torpor/torpord.sock"   # or "127.0.0.1:7300"
    accel = "auto"                                 # auto | kvm | tcg
    token_file = "/var/lib/torpor/api-token"

    [compression]
    default = "none"          # standby compression when neither request nor instance says
    level = 1
    mode = "sync"             # or "background"
    delay = "30s"             # background only: wait this long first
    jobs = 2                  # background jobs at once (default: cores)
    rate_limit = "200M"       # bytes/s a background job reads (default: no cap)
    memory_file_delay = "5m"  # memory-file mode: compress the RAM file after this idle

The file is $TORPOR_CONFIG, else /etc/torpor/torpor.toml if it exists. Environment:
TORPOR_DATA_ROOT, TORPOR_LISTEN, TORPOR_ACCEL, TORPOR_DEFAULT_COMPRESSION (codec[:level]),
TORPOR_COMPRESSION_JOBS, TORPOR_COMPRESSION_RATE_LIMIT. Everything is validated at start;
a bad value is an InvalidArgument naming where it came from.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from torpor.codec import Codec, parse_codec
from torpor.errors import InvalidArgument
from torpor.instances.context import Settings
from torpor.instances.metadata import CompressionPolicy
from torpor.paths import DEFAULT_DATA_ROOT, DataRoot
from torpor.units import parse_duration, parse_size

SYSTEM_CONFIG = Path("/etc/torpor/torpor.toml")
_ENV = {
    "TORPOR_DATA_ROOT": ("data_root",),
    "TORPOR_LISTEN": ("listen",),
    "TORPOR_ACCEL": ("accel",),
    "TORPOR_DEFAULT_COMPRESSION": ("compression", "default"),
    "TORPOR_COMPRESSION_JOBS": ("compression", "jobs"),
    "TORPOR_COMPRESSION_RATE_LIMIT": ("compression", "rate_limit"),
}


def seconds(value: str | float) -> float:
    """A TOML number of seconds, or a duration string ("30s", "5m")."""
    return float(value) if isinstance(value, float | int) else parse_duration(value)


class CompressionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default: str = "none"  # codec, or codec:level
    level: int | None = None
    mode: Literal["sync", "background"] = "sync"
    delay: str | float = 0.0
    jobs: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=256)
    rate_limit: str | int | None = None
    memory_file_delay: str | float = 300.0  # memory-file mode: idle time before compressing

    def policy(self) -> CompressionPolicy | None:
        """The server default policy; None when compression is off by default."""
        codec_text, sep, level_text = self.default.partition(":")
        codec = parse_codec(codec_text)
        level = self.level
        if sep:
            try:
                level = int(level_text)
            except ValueError:
                raise InvalidArgument(f"compression level must be a number, not "
                                      f"{level_text!r}") from None
        delay = seconds(self.delay)
        policy = CompressionPolicy(codec=codec, level=level, mode=self.mode, delay_s=delay)
        policy.effective_level()
        return None if codec is Codec.NONE else policy

    def rate_limit_bytes(self) -> int | None:
        if self.rate_limit is None:
            return None
        value = parse_size(str(self.rate_limit))
        if value <= 0:
            raise InvalidArgument("compression.rate_limit must be positive")
        return value


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data_root: Path = DEFAULT_DATA_ROOT
    listen: str | None = None  # default: unix:<data_root>/torpord.sock
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    token_file: Path | None = None  # default: <data_root>/api-token
    compression: CompressionConfig = Field(default_factory=CompressionConfig)

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str | None) -> str | None:
        if value is not None:
            parse_listen(value)
        return value

    @property
    def root(self) -> DataRoot:
        return DataRoot(self.data_root.absolute())

    @property
    def listen_address(self) -> ListenAddress:
        return parse_listen(self.listen or f"unix:{self.root.api_socket}")

    @property
    def token_path(self) -> Path:
        return self.token_file or self.root.api_token

    def settings(self) -> Settings:
        return Settings(accel=self.accel, default_compression=self.compression.policy(),
                        compression_jobs=self.compression.jobs,
                        compression_rate_limit=self.compression.rate_limit_bytes(),
                        memory_compression_delay=seconds(self.compression.memory_file_delay))


@dataclass(frozen=True)
class ListenAddress:
    unix_path: Path | None = None
    host: str | None = None
    port: int | None = None

    def __str__(self) -> str:
        return f"unix:{self.unix_path}" if self.unix_path else f"{self.host}:{self.port}"


def parse_listen(value: str) -> ListenAddress:
    """'unix:/path/to.sock' or 'HOST:PORT' (an IPv6 host in brackets)."""
    if value.startswith("unix:"):
        path = value[len("unix:"):]
        if not path:
            raise InvalidArgument("listen: 'unix:' needs a socket path")
        return ListenAddress(unix_path=Path(path).absolute())
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(f"listen: {value!r} is neither unix:PATH nor HOST:PORT")
    return ListenAddress(host=host.strip("[]"), port=int(port))


def _set(tree: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value


def load_config(path: Path | None = None, *, overrides: dict[str, Any] | None = None,
                environ: dict[str, str] | None = None) -> Config:
    """File, then environment, then `overrides` (command-line flags; None values ignored)."""
    environ = dict(os.environ) if environ is None else environ
    path = path or (Path(environ["TORPOR_CONFIG"]) if environ.get("TORPOR_CONFIG") else None)
    if path is None and SYSTEM_CONFIG.exists():
        path = SYSTEM_CONFIG
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = f"config {path}"
        try:
            tree = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise InvalidArgument(f"config file {path} does not exist") from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise InvalidArgument(f"config {path}: {exc}") from None
    for name, keys in _ENV.items():
        if environ.get(name):
            _set(tree, keys, environ[name])
            source += f" + ${name}"
    for key, value in (overrides or {}).items():
        if value is not None:
            _set(tree, (key,), value)
    try:
        config = Config.model_validate(tree)
        config.settings()  # codec names, levels, sizes: all checked now, not at first use
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "config"
        raise InvalidArgument(f"{source}: {where}: {first['msg']}") from None
    except InvalidArgument as exc:
        raise InvalidArgument(f"{source}: {exc.message}") from None
    return config
