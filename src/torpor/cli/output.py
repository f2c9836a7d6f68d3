"""Rendering results for people (rich tables) and scripts (--json)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

from torpor.units import format_seconds, format_size

# Not a terminal (a pipe, a log): do not squeeze tables into 80 columns.
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True)


def _plain(obj: Any) -> Any:
    """What --json prints of a result: a model dumped, or a daemon's answer as it came."""
    if hasattr(obj, "model_dump"):  # a pydantic model (in-process)
        return obj.model_dump(mode="json")
    if hasattr(obj, "as_json"):  # api/client.py's JsonView (through the daemon)
        return obj.as_json()
    if isinstance(obj, list):
        return [_plain(o) for o in obj]
    return obj


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(_plain(obj), indent=2, sort_keys=True) + "\n")


def print_listing(items: list[Any], json_out: bool, what: str,
                  table: Callable[[list[Any]], Table]) -> None:
    """A list command's output: JSON, "no <what>", or the table."""
    if json_out:
        print_json(items)
    elif not items:
        console.print(f"no {what}")
    else:
        console.print(table(items))


def images_table(infos: list[Any]) -> Table:
    table = Table(box=None, header_style="bold")
    for col in ("REFERENCE", "DIGEST", "SIZE", "DISK", "USED BY"):
        table.add_column(col)
    for i in infos:
        table.add_row("\n".join(i.references), i.digest.removeprefix("sha256:")[:12],
                      format_size(i.size), "built" if i.disk_built else "-",
                      ", ".join(i.used_by) or "-")
    return table


def instances_table(infos: list[Any]) -> Table:
    table = Table(box=None, header_style="bold")
    for col in ("NAME", "STATE", "ADDRESS", "CPUS", "MEMORY", "DISK", "PID", "ID"):
        table.add_column(col)
    for i in infos:
        address = (i.network.ip if i.network else None) or "-"
        table.add_row(i.name, str(i.state), address, str(i.cpus),
                      format_size(i.memory_mib << 20), format_size(i.disk_bytes),
                      str(i.pid or "-"), i.id)
    return table


def snapshots_table(records: list[Any]) -> Table:
    table = Table(box=None, header_style="bold")
    # DATA: what it occupies on disk (a 2 GiB sparse disk with 20 MiB written is 20 MiB)
    for col in ("NAME", "SOURCE", "KIND", "MODE", "STATE", "DATA", "CREATED", "TAGS", "ID"):
        table.add_column(col)
    for r in records:
        tags = ",".join(f"{k}={v}" for k, v in r.tags.items()) or "-"
        table.add_row(r.name, r.source_name, r.kind, r.mode, stored_state(r),
                      format_size(r.stored_bytes), r.created_at.isoformat(timespec="seconds"),
                      tags, r.id)
    return table


def remote_snapshots_table(items: list[Any]) -> Table:
    table = Table(box=None, header_style="bold")
    for col in ("NAME", "SOURCE", "KIND", "DATA", "CHUNKS", "QEMU", "PUSHED"):
        table.add_column(col)
    for i in items:
        table.add_row(i.name, i.source_name, i.kind, format_size(i.stored_bytes), str(i.chunks),
                      i.qemu_version or "-", i.pushed_at.isoformat(timespec="seconds"))
    return table


def stored_state(record: Any) -> str:
    """How a snapshot's machine state is stored, and what its compression job is doing."""
    comp = record.compression
    if record.kind == "stopped" or comp is None:
        return "-"
    if comp.state in ("pending", "compressing"):
        return f"raw, {comp.algorithm} {comp.state}"
    if comp.state == "error":
        return f"raw ({comp.algorithm} failed)"
    if comp.state == "compressed":
        return f"{comp.algorithm} {format_size(comp.compressed_bytes or 0)}"
    return "raw"


def operations_table(ops: list[Any]) -> Table:
    table = Table(box=None, header_style="bold")
    for col in ("KIND", "TRIGGER", "INSTANCE", "STATE", "STARTED", "TOOK", "PROGRESS",
                "ERROR"):
        table.add_column(col)
    for op in ops:
        took = (format_seconds((op.finished_at - op.started_at).total_seconds())
                if op.finished_at else "-")
        progress = ", ".join(f"{p.stage} {format_size(p.done_bytes)}" for p in op.progress)
        table.add_row(op.kind, op.get("trigger", "api"), op.instance or "-", str(op.state),
                      op.started_at.isoformat(timespec="seconds"), took, progress or "-",
                      op.error.code if op.error else "-")
    return table


def phases_line(phases: dict[str, float]) -> str:
    return ", ".join(f"{name} {format_seconds(s)}" for name, s in phases.items())


def instance_details(info: Any) -> Table:
    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("name", info.name), ("id", info.id), ("state", str(info.state)),
        ("cpus", str(info.cpus)), ("memory", format_size(info.memory_mib << 20)),
        ("disk", format_size(info.disk_bytes)), ("mac", info.mac),
        ("pid", str(info.pid or "-")), ("accel", info.accel or "-"),
        ("created", info.created_at.isoformat(timespec="seconds")), ("path", str(info.path)),
        ("image", info.image + (f" ({info.image_digest})" if info.image_digest else "")),
    ]
    if info.exit_code is not None:
        rows.append(("exit code", str(info.exit_code)))
    if info.auto_standby:
        rows.append(("auto-standby", f"after {format_seconds(info.auto_standby)} idle"))
    if info.held_until is not None:
        rows.append(("held until", f"{info.held_until:%Y-%m-%d %H:%M:%S} UTC"))
    net = info.network
    if net is not None:
        rows.append(("network", net.mode + (f" {net.ip} on {net.bridge}" if net.ip else "")
                     + (", reaches its peers" if net.allow_peers else "")))
        if net.published:
            rows.append(("published", ", ".join(net.published)))
    comp = info.compression
    if comp.state != "none" or comp.raw_bytes:
        detail = str(comp.state) + (f" ({comp.algorithm})" if comp.algorithm else "")
        if comp.compressed_bytes and comp.raw_bytes:
            detail += (f": {format_size(comp.raw_bytes)} → {format_size(comp.compressed_bytes)}"
                       f", {comp.raw_bytes / comp.compressed_bytes:.1f}x")
        elif comp.raw_bytes:
            detail += f": {format_size(comp.raw_bytes)} raw"
        if comp.error:
            detail += f" ({comp.error})"
        rows.append(("standby state", detail))
    op = info.last_operation
    if op is not None:
        rows.append(("last operation", f"{op.kind}: {op.result}"
                     + (f" ({op.error})" if op.error else "")))
        rows.append(("phases", phases_line(op.phases) or "-"))
    for key, value in rows:
        table.add_row(key, value)
    return table
