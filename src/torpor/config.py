"""torpor's configuration: one TOML file, environment variables over it, flags over both.

Every setting is declared once, as a field of `Config` (or `CompressionConfig`): its type,
its default and its description. From that declaration come the TOML key (the field's
path: `compression.jobs`), the environment variable (`TORPOR_` + the path in capitals:
`TORPOR_COMPRESSION_JOBS`, or the one named in the field's `env`), the help of the
command-line flag that sets it (`help_for`), and the reference `torpor config --list`
prints. The file is $TORPOR_CONFIG, else /etc/torpor/torpor.toml if it exists.
Everything is validated at start; a bad value is an InvalidArgument naming where it came
from.
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
def seconds(value: str | float) -> float:
    """A TOML number of seconds, or a duration string ("30s", "5m")."""
    return float(value) if isinstance(value, float | int) else parse_duration(value)


class CompressionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default: str = Field("none", description=(
        "standby compression when neither the request nor the instance says: a codec"
        " (zstd, lz4, none), or codec:level"),
        json_schema_extra={"env": "TORPOR_DEFAULT_COMPRESSION"})
    level: int | None = Field(None, description="the default codec's level")
    mode: Literal["sync", "background"] = Field("sync", description=(
        "sync: compress while saving; background: save raw, compress later"))
    delay: str | float = Field(0.0, description="background: wait this long first (30s, 5m)")
    jobs: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=256,
                      description="background jobs at once (default: cores)")
    rate_limit: str | int | None = Field(None, description=(
        "bytes/s a background job reads (200M; default: no cap)"))
    memory_file_delay: str | float = Field(300.0, description=(
        "memory-file mode: compress the RAM file after this idle time"),
        json_schema_extra={"env": "TORPOR_MEMORY_COMPRESSION_DELAY"})

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

    data_root: Path = Field(DEFAULT_DATA_ROOT, description="where instances, snapshots and"
                            " the daemon's socket live")
    listen: str | None = Field(None, description=(
        "the daemon's address: unix:PATH or HOST:PORT (default: unix:<data_root>/torpord.sock)"))
    accel: Literal["auto", "kvm", "tcg"] = Field("auto", description=(
        "accelerator: auto (probe KVM, fall back to TCG), kvm or tcg"))
    token_file: Path | None = Field(None, description=(
        "the daemon's bearer token (default: <data_root>/api-token)"))
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


@dataclass(frozen=True)
class Setting:
    """One leaf of Config, as the file, the environment and the flags see it."""

    key: tuple[str, ...]  # the TOML path
    env: str
    description: str
    default: Any


def _settings(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[Setting]:
    found = []
    for name, field in model.model_fields.items():
        key = (*prefix, name)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            found += _settings(field.annotation, key)
            continue
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        env = str(extra.get("env") or "TORPOR_" + "_".join(key).upper())
        default = "(derived)" if field.default_factory is not None else field.default
        found.append(Setting(key, env, field.description or "", default))
    return found


SETTINGS: list[Setting] = _settings(Config)


def setting(key: str) -> Setting:
    """The declaration of `key` ("compression.jobs")."""
    for s in SETTINGS:
        if ".".join(s.key) == key:
            return s
    raise KeyError(key)


def help_for(key: str) -> str:
    """A flag's help: the setting's description, and where else it can be set."""
    s = setting(key)
    return f"{s.description[:1].upper()}{s.description[1:]} (config {key}, ${s.env})."


def _set(tree: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value


def load_config(path: Path | None = None, *, overrides: dict[str, Any] | None = None,
                environ: dict[str, str] | None = None) -> Config:
    """File, then environment, then `overrides` (command-line flags, by setting key such
    as "data_root"; None values ignored)."""
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
    for s in SETTINGS:
        if environ.get(s.env):
            _set(tree, s.key, environ[s.env])
            source += f" + ${s.env}"
    for key, value in (overrides or {}).items():
        if value is not None:
            _set(tree, setting(key).key, value)
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
