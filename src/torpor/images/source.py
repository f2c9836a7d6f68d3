"""What a create request asks of an OCI image (kept free of heavy imports: the CLI's
daemon client builds it too)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class OciSource:
    """An image reference (pulled if missing) and the overrides of what it runs."""

    reference: str
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    env: list[str] = field(default_factory=list)
    workdir: str | None = None
    user: str | None = None
    insecure: bool = False  # plain HTTP to a registry that is not on loopback
