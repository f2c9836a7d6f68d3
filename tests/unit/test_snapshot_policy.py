"""What a stored snapshot does with its machine state, decided before anything happens:
standby's precedence (request > instance > default), its modes, and the refusals."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from torpor.codec import Codec
from torpor.errors import InvalidArgument, Unsupported
from torpor.instances.metadata import CompressionPolicy, InstanceState
from torpor.operations.snapshots import snapshot_compression

S = InstanceState
NONE = CompressionPolicy()
ZSTD = CompressionPolicy(codec=Codec.ZSTD, level=3)
LZ4_BG = CompressionPolicy(codec=Codec.LZ4, mode="background", delay_s=7)


def ctx(state: InstanceState, instance: CompressionPolicy | None = None,
        default: CompressionPolicy | None = None, memory: str = "anonymous") -> Any:
    return SimpleNamespace(
        name="vm", state=state,
        meta=SimpleNamespace(snapshot_policy=instance, memory_backing=memory),
        settings=SimpleNamespace(default_compression=default, memory_compression_delay=300.0))


def decide(context: Any, request: CompressionPolicy | None) -> tuple[str, str | None]:
    """(the codec the save uses, the codec of the job's plan or None)."""
    save, plan = snapshot_compression(context, request)
    return str(save.codec), (str(plan.codec) if plan else None)


@pytest.mark.parametrize(("context", "request_", "expected"), [
    # precedence: the request, then the instance's policy, then the default
    (ctx(S.RUNNING, instance=ZSTD, default=LZ4_BG), None, ("zstd", None)),
    (ctx(S.RUNNING, default=LZ4_BG), None, ("none", "lz4")),
    (ctx(S.RUNNING, instance=ZSTD), LZ4_BG, ("none", "lz4")),
    (ctx(S.RUNNING, instance=ZSTD), NONE, ("none", None)),  # an explicit none wins too
    (ctx(S.PAUSED), ZSTD, ("zstd", None)),
    # memory-file mode: always a job (on the RAM file), as standby does
    (ctx(S.RUNNING, memory="file"), ZSTD, ("none", "zstd")),
    # at rest: a standby source's copy can get a job; nothing else applies
    (ctx(S.STANDBY), LZ4_BG, ("none", "lz4")),
    (ctx(S.STANDBY, instance=ZSTD), None, ("none", None)),  # its standby applied it
    (ctx(S.STOPPED, instance=LZ4_BG), None, ("none", None)),
    (ctx(S.STOPPED), NONE, ("none", None)),
])
def test_what_a_snapshot_does_with_its_state(context: Any, request_: CompressionPolicy | None,
                                             expected: tuple[str, str | None]) -> None:
    assert decide(context, request_) == expected


def test_the_plan_keeps_the_delay_of_the_policy_it_comes_from() -> None:
    _, plan = snapshot_compression(ctx(S.RUNNING), LZ4_BG)
    _, memory_plan = snapshot_compression(ctx(S.RUNNING, memory="file"), ZSTD)
    assert plan is not None and memory_plan is not None
    assert memory_plan.not_before - plan.not_before == pytest.approx(300.0 - 7, abs=1)


def test_what_cannot_be_honoured_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="no machine state to compress"):
        snapshot_compression(ctx(S.STOPPED), ZSTD)
    with pytest.raises(Unsupported, match="--background"):
        snapshot_compression(ctx(S.STANDBY), ZSTD)
    with pytest.raises(InvalidArgument):  # a bad level is refused like standby's
        snapshot_compression(ctx(S.RUNNING), CompressionPolicy(codec=Codec.ZSTD, level=99))
