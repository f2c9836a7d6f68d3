"""torpor's configuration: one TOML file, environment variables over it, flags over both.

Which settings there are, their defaults, descriptions and environment variables are
declared in torpor/settings.py; here they are validated (`Config`, whose fields take
their defaults and descriptions from there). The file is the flag's, else
$TORPOR_CONFIG, else /etc/torpor/torpor.toml if it exists. Everything is validated at
start; a bad value is an InvalidArgument naming where it came from.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from torpor.api.listen import ListenAddress, config_file, parse_listen
from torpor.codec import Codec, parse_compression
from torpor.errors import InvalidArgument
from torpor.instances.context import Settings
from torpor.instances.metadata import CompressionPolicy
from torpor.paths import DataRoot
from torpor.settings import SETTINGS, setting
from torpor.units import parse_duration, parse_idle, parse_size


def seconds(value: str | float) -> float:
    """A TOML number of seconds, or a duration string ("30s", "5m")."""
    return float(value) if isinstance(value, float | int) else parse_duration(value)


def declared(key: str, **constraints: Any) -> Any:
    """The field of setting `key`: its default and description from torpor.settings."""
    s = setting(key)
    if s.default_factory is not None:
        return Field(default_factory=s.default_factory, description=s.description,
                     **constraints)
    return Field(s.default, description=s.description, **constraints)


class CompressionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default: str = declared("compression.default")
    level: int | None = declared("compression.level")
    mode: Literal["sync", "background"] = declared("compression.mode")
    delay: str | float = declared("compression.delay")
    jobs: int = declared("compression.jobs", ge=1, le=256)
    rate_limit: str | int | None = declared("compression.rate_limit")
    memory_file_delay: str | float = declared("compression.memory_file_delay")

    def policy(self) -> CompressionPolicy | None:
        """The server default policy; None when compression is off by default."""
        codec_text, sep, level_text = self.default.partition(":")
        codec, store_incompressible = parse_compression(codec_text)
        level = self.level
        if sep:
            try:
                level = int(level_text)
            except ValueError:
                raise InvalidArgument(f"compression level must be a number, not "
                                      f"{level_text!r}") from None
        delay = seconds(self.delay)
        policy = CompressionPolicy(codec=codec, level=level, mode=self.mode, delay_s=delay,
                                   store_incompressible=store_incompressible)
        policy.effective_level()
        return None if codec is Codec.NONE else policy

    def rate_limit_bytes(self) -> int | None:
        if self.rate_limit is None:
            return None
        value = parse_size(str(self.rate_limit))
        if value <= 0:
            raise InvalidArgument("compression.rate_limit must be positive")
        return value


class NetworkConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default: Literal["user", "bridge", "none"] = declared("network.default")
    bridge: str = declared("network.bridge", pattern=r"^[A-Za-z0-9_.-]{1,15}$")
    subnet: str = declared("network.subnet")
    nat: bool = declared("network.nat")
    dns: str = declared("network.dns")

    @field_validator("dns")
    @classmethod
    def _check_dns(cls, value: str) -> str:
        import ipaddress

        for server in filter(None, (s.strip() for s in value.split(","))):
            address, _, port = server.partition("#")
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise ValueError(f"{server!r} is not IP or IP#PORT") from None
            if port and not (port.isdigit() and 0 < int(port) < 65536):
                raise ValueError(f"{server!r}: bad port")
        return value

    @property
    def dns_servers(self) -> tuple[str, ...]:
        return tuple(filter(None, (s.strip() for s in self.dns.split(","))))

    @field_validator("subnet")
    @classmethod
    def _check_subnet(cls, value: str) -> str:
        import ipaddress

        try:
            net = ipaddress.IPv4Network(value)
        except ValueError as exc:
            raise ValueError(f"not an IPv4 subnet: {exc}") from None
        if net.num_addresses < 4:
            raise ValueError("the subnet needs room for the bridge and a guest")
        return value


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data_root: Path = declared("data_root")
    listen: str | None = declared("listen")
    accel: Literal["auto", "kvm", "tcg"] = declared("accel")
    token_file: Path | None = declared("token_file")
    auto_standby: str | float = declared("auto_standby")
    auto_standby_cpu: float = declared("auto_standby_cpu", ge=0, le=1)
    restore_pool: int = declared("restore_pool", ge=0, le=64)
    compression: CompressionConfig = Field(default_factory=CompressionConfig)
    network: NetworkConfig = Field(default_factory=NetworkConfig)

    @field_validator("auto_standby")
    @classmethod
    def _check_auto_standby(cls, value: str | float) -> str | float:
        parse_idle(value)
        return value

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
                        memory_compression_delay=seconds(self.compression.memory_file_delay),
                        auto_standby=parse_idle(self.auto_standby),
                        auto_standby_cpu=self.auto_standby_cpu,
                        restore_pool=self.restore_pool,
                        network_default=self.network.default,
                        network_bridge=self.network.bridge,
                        network_subnet=self.network.subnet, network_nat=self.network.nat,
                        network_dns=self.network.dns_servers)


def _set(tree: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value


def load_config(path: Path | None = None, *, overrides: dict[str, Any] | None = None,
                environ: dict[str, str] | None = None) -> Config:
    """File, then environment, then `overrides` (command-line flags, by setting key such
    as "data_root"; None values ignored)."""
    environ = dict(os.environ) if environ is None else environ
    path = config_file(path, environ)
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
            _set(tree, s.path, environ[s.env])
            source += f" + ${s.env}"
    for key, value in (overrides or {}).items():
        if value is not None:
            _set(tree, setting(key).path, value)
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
