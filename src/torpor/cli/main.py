"""`torpor`: create, run and stop VMs (and, later, standby, restore and fork them)."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, cast

import typer

from torpor.api.listen import daemon_listening, find_daemon, parse_listen
from torpor.cli.output import (
    console,
    err_console,
    images_table,
    instance_details,
    instances_table,
    operations_table,
    phases_line,
    print_json,
    print_listing,
    remote_snapshots_table,
    snapshots_table,
    stored_state,
)
from torpor.cli.progress import run, with_progress
from torpor.errors import Interrupted, InvalidArgument, TorporError, Unsupported
from torpor.guest.result import OUTPUT_LIMIT
from torpor.settings import SETTINGS, help_for
from torpor.units import format_size, parse_duration, parse_idle, parse_size

if TYPE_CHECKING:  # imported where used: a command loads only its own path (see manager())
    from typing import TypeAlias

    from torpor.api.client import RemoteManager
    from torpor.config import Config
    from torpor.instances.info import InstanceInfo
    from torpor.instances.metadata import CompressionPolicy
    from torpor.instances.states import TargetState
    from torpor.manager import InstanceManager

    Backend: TypeAlias = InstanceManager | RemoteManager

T = TypeVar("T")

# Plain help text: docstrings are wrapped at 92 columns, and the terminal wraps again
# (rich markup mode kept each line break; it would also eat a literal "[...]").
app = typer.Typer(
    name="torpor", no_args_is_help=True, add_completion=False,
    pretty_exceptions_enable=False, rich_markup_mode="markdown",
    help="Put QEMU VMs into standby, restore them and fork them.",
)
image_app = typer.Typer(no_args_is_help=True, rich_markup_mode="markdown", help="Guest images.")
app.add_typer(image_app, name="image")
snapshot_app = typer.Typer(no_args_is_help=True, rich_markup_mode="markdown",
                           help="Stored snapshots of instances.")
app.add_typer(snapshot_app, name="snapshot")

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
NameArg = Annotated[str, typer.Argument(metavar="NAME", help="Instance name.")]
ForkNameArg = Annotated[str, typer.Argument(metavar="NEWNAME", help="Name of the fork.")]
SnapshotArg = Annotated[str, typer.Argument(metavar="SNAPSHOT", help="Snapshot name or id.")]


def config(ctx: typer.Context) -> Config:
    """The whole configuration, validated (loaded only by commands that need it)."""
    from torpor.config import load_config

    obj: dict[str, Any] = ctx.ensure_object(dict)
    if "config" not in obj:
        obj["config"] = load_config(obj["config_file"], overrides={
            "data_root": obj["data_root"], "accel": obj["accel"]})
    result: Config = obj["config"]
    return result


def manager(ctx: typer.Context) -> Backend:
    """The daemon's client when one listens for this data root (unless --local); else
    the library in-process. Finding the daemon loads only what the client needs: the
    whole config (and the library) only in-process."""
    obj: dict[str, Any] = ctx.ensure_object(dict)
    if "manager" not in obj:
        daemon = None if obj["local"] else find_daemon(obj["config_file"], obj["data_root"])
        backend: Backend
        if daemon is not None and daemon_listening(daemon.listen):
            try:
                token = daemon.token_file.read_text().strip()
            except OSError as exc:
                raise InvalidArgument(f"a daemon listens on {daemon.listen} but its token"
                                      f" {daemon.token_file} is unreadable ({exc.strerror});"
                                      " use --local to work without it") from None
            from torpor.api.client import RemoteManager

            backend = RemoteManager(daemon.listen, token)
        else:
            from torpor.manager import InstanceManager

            cfg = config(ctx)
            mgr = InstanceManager(cfg.root.root, cfg.settings())
            # A manager starting up re-queues background jobs a restart or a kill orphaned.
            for line in mgr.recover_jobs():
                err_console.print(f"compression: {line}")
            backend = mgr
        obj["manager"] = backend
    found: Backend = obj["manager"]
    return found


@app.callback()
def main_options(
    ctx: typer.Context,
    data_root: Annotated[Path | None, typer.Option(
        "--data-root", help=help_for("data_root"), show_default=False)] = None,
    accel: Annotated[str | None, typer.Option(
        help=help_for("accel"), show_default=False)] = None,
    config_file: Annotated[Path | None, typer.Option(
        "--config", help="Config file (TOML; default $TORPOR_CONFIG or "
        "/etc/torpor/torpor.toml).", show_default=False)] = None,
    local: Annotated[bool, typer.Option(
        "--local", help="Use the library in-process even if a daemon is running.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log each phase.")] = False,
) -> None:
    if accel not in (None, "auto", "kvm", "tcg"):
        raise typer.BadParameter("must be auto, kvm or tcg", param_hint="--accel")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    ctx.ensure_object(dict).update(data_root=data_root, accel=accel, config_file=config_file,
                                   local=local)


@app.command()
def serve(ctx: typer.Context,
          listen: Annotated[str | None, typer.Option(
              metavar="ADDRESS", help=help_for("listen"), show_default=False)] = None) -> None:
    """Run torpord, the daemon serving the REST API for the data root."""
    from torpor.api.server import serve as run_server

    cfg = config(ctx)
    if listen is not None:
        parse_listen(listen)  # a bad address is an error before anything starts
        cfg = cfg.model_copy(update={"listen": listen})
    logging.getLogger("torpor").setLevel(logging.INFO)
    run_server(cfg)


@app.command()
def operations(ctx: typer.Context,
               instance: Annotated[str | None, typer.Option(
                   metavar="NAME", help="Only this instance's operations.",
                   show_default=False)] = None,
               json_out: JsonOpt = False) -> None:
    """List the daemon's recent operations, with their progress and phases."""
    backend = manager(ctx)
    if not backend.remote:
        raise Unsupported("operations are tracked by the daemon: start `torpor serve` first")
    remote = cast("RemoteManager", backend)
    print_listing(run(remote.operations(instance)), json_out, "operations", operations_table)


@app.command("openapi")
def openapi_cmd() -> None:
    """Print the API's OpenAPI document (what `openapi.json` in the repository holds)."""
    from torpor.api.app import openapi_document

    sys.stdout.write(openapi_document() + "\n")


@app.command("config")
def config_cmd(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """Every setting's value in effect, config key and environment variable."""
    effective = config(ctx).model_dump(mode="json")
    rows = []
    for s in SETTINGS:
        value: Any = effective
        for part in s.path:
            value = value[part]
        rows.append({"key": s.key, "value": value, "env": s.env,
                     "description": s.description})
    if json_out:
        print_json(rows)
        return
    for row in rows:
        console.print(f"{row['key']} = {json.dumps(row['value'])}  (${row['env']})",
                      highlight=False, soft_wrap=True)
        console.print(f"    {row['description']}", highlight=False, style="dim")


@app.command()
def create(
    ctx: typer.Context,
    name: NameArg,
    memory: Annotated[str, typer.Option(
        metavar="SIZE", help="Guest RAM, e.g. 512M or 2G.")] = "512M",
    cpus: Annotated[int, typer.Option(metavar="N", help="Virtual CPUs.")] = 1,
    disk_size: Annotated[str, typer.Option(
        metavar="SIZE", help="Root disk size (sparse).")] = "2G",
    compress: CompressOpt = None,
    level: LevelOpt = None,
    memory_backing: Annotated[str, typer.Option(
        metavar="MODE", help="Guest RAM: anonymous, or file (memory-file mode: standby and "
                             "restore in milliseconds, forks share RAM).")] = "anonymous",
    image: Annotated[str | None, typer.Option(
        metavar="REF", help="An OCI image (pulled if missing), e.g. busybox or ghcr.io/o/app:1; "
             "default: the built-in guest.", show_default=False)] = None,
    env: Annotated[list[str] | None, typer.Option(
        "--env", "-e", metavar="KEY=VALUE", help="KEY=VALUE for the image's command (repeatable).",
        show_default=False)] = None,
    cmd: Annotated[str | None, typer.Option(
        metavar="COMMAND", help="Replaces the image's Cmd (split like a shell would).",
        show_default=False)] = None,
    entrypoint: Annotated[str | None, typer.Option(
        metavar="COMMAND",
        help="Replaces the image's Entrypoint (and drops its Cmd unless --cmd).",
        show_default=False)] = None,
    workdir: Annotated[str | None, typer.Option(
        metavar="DIR", help="Replaces the image's WorkingDir.", show_default=False)] = None,
    user: Annotated[str | None, typer.Option(
        metavar="USER", help="Replaces the image's User (name or uid[:gid]).",
        show_default=False)] = None,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="Plain HTTP to a registry that is not on loopback.")] = False,
    publish: Annotated[list[str] | None, typer.Option(
        "--publish", "-p", metavar="PORTS",
        help=r"\[HOST_IP:]HOST_PORT:GUEST_PORT\[/tcp] (repeatable): the host port reaches the "
             "guest's (host address default 127.0.0.1).",
        show_default=False)] = None,
    network: Annotated[str | None, typer.Option(
        metavar="MODE", help="user (QEMU user mode), bridge (an address of its own on "
                             "torpor's bridge) or none; default: network.default.",
        show_default=False)] = None,
    allow_peers: Annotated[bool, typer.Option(
        "--allow-peers", help="Bridge: may reach, and be reached by, other instances that "
                              "allow peer traffic (guests are isolated from each other by "
                              "default).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Create an instance (stopped): of an OCI image, or of the built-in guest."""
    import shlex

    from torpor.images.source import OciSource

    if memory_backing not in ("anonymous", "file"):
        raise typer.BadParameter("must be anonymous or file", param_hint="--memory-backing")
    if network not in (None, "user", "bridge", "none"):
        raise typer.BadParameter("must be user, bridge or none", param_hint="--network")
    if image is None and (env or cmd or entrypoint or workdir or user):
        raise typer.BadParameter("--env, --cmd, --entrypoint, --workdir and --user need "
                                 "--image", param_hint="--image")
    try:
        oci = None if image is None else OciSource(
            reference=image, env=env or [], workdir=workdir, user=user, insecure=insecure,
            cmd=shlex.split(cmd) if cmd is not None else None,
            entrypoint=shlex.split(entrypoint) if entrypoint is not None else None)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--cmd/--entrypoint") from None
    from torpor.api.client import RemoteManager

    backend = manager(ctx)
    if oci is not None and not isinstance(backend, RemoteManager):
        _pull_if_missing(backend, oci)
    info = run(backend.create(name, memory_bytes=parse_size(memory, "M"), cpus=cpus,
                              disk_bytes=parse_size(disk_size, "G"),
                              snapshot_policy=compression_policy(compress, level),
                              memory_backing=memory_backing,  # type: ignore[arg-type]
                              network=network, publish=publish or [],  # type: ignore[arg-type]
                              oci=oci, allow_peers=allow_peers))
    if json_out:
        print_json(info)
    else:
        console.print(f"created {info.name} ({info.id})")


@app.command()
def start(ctx: typer.Context, name: NameArg,
          no_wait: Annotated[bool, typer.Option(
              "--no-wait", help="Return once QEMU runs, without waiting for the agent.")] = False,
          json_out: JsonOpt = False) -> None:
    """Boot an instance and wait until its guest agent answers."""
    info = run(manager(ctx).start(name, wait_agent=not no_wait))
    if json_out:
        print_json(info)
    else:
        phases = info.last_operation.phases if info.last_operation else {}
        if info.exit_code is not None:  # an image whose command ended during the boot
            console.print(f"{info.name} ran and its command exited with code "
                          f"{info.exit_code} ({phases_line(phases)})")
        else:
            console.print(f"{info.name} is {info.state} (pid {info.pid}; "
                          f"{phases_line(phases)})")


@app.command()
def stop(ctx: typer.Context, name: NameArg,
         timeout: Annotated[float, typer.Option(
             metavar="SECONDS", help="Seconds to wait for a clean power-off before QEMU is "
                                     "told to quit, then killed.")] = 10,
         force: Annotated[bool, typer.Option("--force", help="Kill QEMU at once.")] = False,
         json_out: JsonOpt = False) -> None:
    """Shut an instance down (graceful power-off, then quit, then kill)."""
    info = run(manager(ctx).stop(name, timeout=timeout, force=force))
    if json_out:
        print_json(info)
    else:
        console.print(f"{info.name} is {info.state}")


CompressOpt = Annotated[str | None, typer.Option(
    "--compress", metavar="CODEC",
    help="Compress the machine state: auto (zstd storing raw what does not compress, done "
         "after the pause), zstd, lz4 or none.",
    show_default=False)]
LevelOpt = Annotated[int | None, typer.Option(
    metavar="N", help="Compression level (zstd 1..19 or negative fast levels, default 1; "
                      "lz4 0..12, default 0).", show_default=False)]


def compression_policy(compress: str | None, level: int | None, background: bool = False,
                       delay: str | None = None) -> CompressionPolicy | None:
    if compress is None:
        for flag, given in (("--level", level is not None), ("--background", background),
                            ("--delay", delay is not None)):
            if given:
                raise typer.BadParameter(f"{flag} needs --compress", param_hint=flag)
        return None
    if delay is not None and not background:
        raise typer.BadParameter("--delay only applies with --background", param_hint="--delay")
    from torpor.codec import parse_compression
    from torpor.instances.metadata import CompressionPolicy

    codec, store_incompressible = parse_compression(compress)
    policy = CompressionPolicy(codec=codec, level=level,
                               mode="background" if background else "sync",
                               delay_s=parse_duration(delay) if delay else 0.0,
                               store_incompressible=store_incompressible)
    policy.effective_level()
    return policy


BackgroundOpt = Annotated[bool, typer.Option(
    "--background", help="Save raw now (shortest pause); compress later in a background job.")]
DelayOpt = Annotated[str | None, typer.Option(
    metavar="DURATION", help="With --background: wait this long before compressing (e.g. 30s, 5m).",
    show_default=False)]


@app.command()
def standby(ctx: typer.Context, name: NameArg, compress: CompressOpt = None,
            level: LevelOpt = None, background: BackgroundOpt = False, delay: DelayOpt = None,
            json_out: JsonOpt = False) -> None:
    """Save the VM's machine state and stop QEMU: its host memory is released."""
    policy = compression_policy(compress, level, background, delay)
    backend = manager(ctx)
    info = with_progress(backend, "standby", lambda: backend.standby(name, policy))
    report_operation(info, json_out)


@app.command()
def restore(ctx: typer.Context, name: NameArg, json_out: JsonOpt = False) -> None:
    """Bring a VM in standby back, exactly where it was."""
    backend = manager(ctx)
    info = with_progress(backend, "restore", lambda: backend.restore(name))
    report_operation(info, json_out)


@app.command()
def resume(ctx: typer.Context, name: NameArg, json_out: JsonOpt = False) -> None:
    """Resume a VM left paused (e.g. by an operation that was killed)."""
    report_operation(run(manager(ctx).resume(name)), json_out)


@app.command()
def check(ctx: typer.Context,
          repair: Annotated[bool, typer.Option(
              "--repair", help="Fix what is safe to fix (debris of killed operations, VMs left"
              " paused, crashed QEMUs); say what is left.")] = False,
          json_out: JsonOpt = False) -> None:
    """Report every inconsistency in the data root; exit 1 while problems remain.

    Runs in-process even when a daemon listens: it takes each instance's lock like any
    operation, and leaves alone an instance that is busy."""
    cfg = config(ctx)
    from torpor.manager import InstanceManager

    mgr = InstanceManager(cfg.root.root, cfg.settings(), lock_wait=0)
    problems = run(mgr.check(repair=repair))
    remaining = [p for p in problems if not p.repaired]
    if json_out:
        print_json({"problems": [p.model_dump() for p in problems]})
    elif not problems:
        console.print(f"{cfg.root.root}: no problems")
    else:
        for p in problems:
            mark = "repaired" if p.repaired else "problem"
            console.print(f"{mark:8}  {p.kind:18} {p.path}  ({p.detail})", highlight=False,
                          soft_wrap=True)
    if remaining:
        raise typer.Exit(1)


@app.command()
def policy(ctx: typer.Context, name: NameArg, compress: CompressOpt = None,
           level: LevelOpt = None, background: BackgroundOpt = False, delay: DelayOpt = None,
           clear: Annotated[bool, typer.Option(
               "--clear", help="Compression: use the default.")] = False,
           auto_standby: Annotated[str | None, typer.Option(
               metavar="DURATION",
               help="Go into standby after this long idle (30s, 5m; 0 or off: never; "
                    "default: the daemon's auto_standby). Idle: no connection on its "
                    "published ports, no operation or exec on it, no hold.",
               show_default=False)] = None,
           ) -> None:
    """Set the instance's standby compression and auto-standby policies (what is not
    given stays as it is)."""
    backend = manager(ctx)
    if auto_standby is not None:
        try:
            idle = None if auto_standby == "default" else parse_idle(auto_standby)
        except TorporError as exc:
            raise typer.BadParameter(str(exc), param_hint="--auto-standby") from None
        run(backend.set_auto_standby(name, idle))
        console.print(f"{name}: auto-standby " + (
            "default" if idle is None else "off" if idle == 0 else f"after {auto_standby} idle"))
    if auto_standby is None or compress or level is not None or background or delay or clear:
        chosen = None if clear else compression_policy(compress or "none", level, background,
                                                       delay)
        run(backend.set_policy(name, chosen))
        console.print(f"{name}: standby compression "
                      + ("default" if chosen is None else f"{chosen.codec} "
                         f"level {chosen.effective_level()}"))


@app.command()
def hold(ctx: typer.Context, name: NameArg,
         for_: Annotated[str, typer.Option(
             "--for", metavar="DURATION", help="How long (30s, 10m, 2h; at most a week).")] = "10m",
         json_out: JsonOpt = False) -> None:
    """Keep an instance awake: no auto-standby until the hold ends or is released."""
    try:
        seconds = parse_duration(for_)
    except TorporError as exc:
        raise typer.BadParameter(str(exc), param_hint="--for") from None
    info = run(manager(ctx).hold(name, seconds))
    if json_out:
        print_json(info)
    else:
        console.print(f"{name} is held awake until {info.held_until:%Y-%m-%d %H:%M:%S} UTC")


@app.command()
def release(ctx: typer.Context, name: NameArg) -> None:
    """End an instance's hold (its idle clock runs again)."""
    run(manager(ctx).release(name))
    console.print(f"{name} is no longer held")


def report_operation(info: InstanceInfo, json_out: bool) -> None:
    if json_out:
        print_json(info)
        return
    op = info.last_operation
    console.print(f"{info.name} is {info.state}")
    if op is not None:
        console.print(f"  {op.kind}: {phases_line(op.phases)}")


@app.command()
def delete(ctx: typer.Context, name: NameArg,
           force: Annotated[bool, typer.Option("--force", help="Kill it if running.")] = False
           ) -> None:
    """Delete an instance and everything in its directory."""
    run(manager(ctx).delete(name, force=force))
    console.print(f"deleted {name}")


@app.command("list")
def list_cmd(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """List instances with their derived state."""
    print_listing(run(manager(ctx).list_all()), json_out, "instances", instances_table)


@app.command()
def show(ctx: typer.Context, name: NameArg, json_out: JsonOpt = False) -> None:
    """Show one instance: state, resources and the last operation's phases."""
    info = run(manager(ctx).get(name))
    if json_out:
        print_json(info)
    else:
        console.print(instance_details(info))


# qemu-ga takes its input in one request, base64 (through the daemon: under its 16 MiB
# request cap).
STDIN_LIMIT = 8 << 20


def read_stdin() -> bytes:
    data = sys.stdin.buffer.read(STDIN_LIMIT + 1)
    if len(data) > STDIN_LIMIT:
        raise InvalidArgument(f"--stdin takes at most {STDIN_LIMIT >> 20} MiB; copy larger "
                              "data in through the guest's network or disk")
    return data


@app.command("exec", context_settings={"allow_interspersed_args": False})
def exec_cmd(
    ctx: typer.Context, name: NameArg,
    command: Annotated[list[str], typer.Argument(metavar="COMMAND…",
                                                   help="Command and arguments (after --).")],
    timeout: Annotated[float, typer.Option(metavar="SECONDS",
                                           help="Seconds before giving up.")] = 60,
    stdin: Annotated[bool, typer.Option("--stdin", "-i", help=(
        "Send this standard input to the command (read to its end first; at most "
        f"{STDIN_LIMIT >> 20} MiB)."))] = False,
) -> None:
    """Run a command in the guest through its agent; exits with the command's code."""
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise typer.BadParameter("give the command to run after --", param_hint="COMMAND")
    data = read_stdin() if stdin else None
    result = run(manager(ctx).exec(name, command, input=data, timeout=timeout))
    sys.stdout.buffer.write(result.stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(result.stderr)
    sys.stderr.flush()
    if result.truncated:
        print(f"torpor: warning: the guest agent kept only the first "
              f"{OUTPUT_LIMIT >> 20} MiB of the command's output", file=sys.stderr)
    raise typer.Exit(result.exit_code if result.signal is None else 128 + result.signal)


FollowOpt = Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new output.")]


@app.command()
def logs(ctx: typer.Context, name: NameArg, follow: FollowOpt = False) -> None:
    """Print an image instance's main process output (stdout and stderr; the built-in
    guest: its console)."""
    backend = manager(ctx)
    _print_log(lambda offset: run(backend.logs(name, offset)), follow)


@app.command()
def console_cmd(ctx: typer.Context, name: NameArg, follow: FollowOpt = False) -> None:
    """Print the guest's serial console log."""
    backend = manager(ctx)
    _print_log(lambda offset: run(backend.console(name, offset)), follow)


def _print_log(read: Any, follow: bool) -> None:
    offset = 0
    while True:
        chunk = read(offset)
        if chunk:
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            offset += len(chunk)
        elif not follow:
            return
        else:
            time.sleep(0.2)


app.registered_commands[-1].name = "console"


TargetOpt = Annotated[str, typer.Option(
    "--target-state", metavar="STATE",
    help="What each fork is left as: running, standby or stopped.")]
CountOpt = Annotated[int, typer.Option(
    metavar="N", help="How many forks (named NEWNAME-1..N if > 1).")]
SourceOpt = Annotated[str | None, typer.Option(
    "--instance", metavar="NAME", help="The snapshot's source instance, when names clash.",
    show_default=False)]


def target_state(value: str) -> TargetState:
    if value not in ("running", "standby", "stopped"):
        raise typer.BadParameter("must be running, standby or stopped", param_hint="--target-state")
    return value  # type: ignore[return-value]


def print_forks(infos: list[InstanceInfo], json_out: bool, started: float) -> None:
    if json_out:
        print_json(infos)
        return
    console.print(instances_table(infos))
    console.print(f"{len(infos)} fork(s) in {time.monotonic() - started:.2f} s")


@app.command()
def fork(ctx: typer.Context,
         source: Annotated[str, typer.Argument(metavar="SOURCE", help="Instance to fork.")],
         new_name: ForkNameArg,
         count: CountOpt = 1, target: TargetOpt = "running", json_out: JsonOpt = False) -> None:
    """Fork an instance (running, standby or stopped) into new instances."""
    started = time.monotonic()
    backend, state = manager(ctx), target_state(target)
    infos = with_progress(backend, "fork", lambda: backend.fork(
        source, new_name, count=count, target_state=state))
    print_forks(infos, json_out, started)


@snapshot_app.command("create")
def snapshot_create(
    ctx: typer.Context, name: NameArg,
    snapshot_name: Annotated[str | None, typer.Option(
        "--name", metavar="NAME", help="Snapshot name (default: a timestamp).",
        show_default=False)] = None,
    tag: Annotated[list[str] | None, typer.Option(metavar="KEY=VALUE", help="Repeatable.")] = None,
    serial: Annotated[bool, typer.Option(
        "--serial", help="Save, then copy (instead of both at once while paused).")] = False,
    compress: CompressOpt = None, level: LevelOpt = None, background: BackgroundOpt = False,
    delay: DelayOpt = None, json_out: JsonOpt = False,
) -> None:
    """Snapshot an instance; a running one is paused only while state and disk are taken.
    Its machine state is compressed by the same rules as standby (this request, then the
    instance's policy, then the configured default)."""
    snap_name = snapshot_name or time.strftime("snap-%Y%m%d-%H%M%S")
    from torpor.instances.snapshotrecord import parse_tags

    backend, tags = manager(ctx), parse_tags(tag or [])
    policy = compression_policy(compress, level, background, delay)
    record = with_progress(backend, "snapshot", lambda: backend.snapshot_create(
        name, snap_name, tags, serial=serial, compression=policy))
    if json_out:
        print_json(record)
    else:
        console.print(f"snapshot {record.name} ({record.id}) of {record.source_name}: "
                      f"{record.kind}, {record.mode}, copy {record.copy_method}, state "
                      f"{stored_state(record)}; {phases_line(record.phases)}")


@snapshot_app.command("list")
def snapshot_list(ctx: typer.Context,
                  instance: Annotated[str | None, typer.Argument(
                      metavar="NAME", help="Only this instance's snapshots.")] = None,
                  json_out: JsonOpt = False) -> None:
    """List stored snapshots."""
    print_listing(manager(ctx).snapshot_list(instance), json_out, "snapshots",
                  snapshots_table)


@snapshot_app.command("show")
def snapshot_show(ctx: typer.Context, snapshot: SnapshotArg,
                  instance: SourceOpt = None) -> None:
    """Show one snapshot's record (JSON either way: it is a record)."""
    print_json(manager(ctx).snapshot_get(snapshot, instance))


@snapshot_app.command("delete")
def snapshot_delete(ctx: typer.Context, snapshot: SnapshotArg,
                    instance: SourceOpt = None) -> None:
    """Delete a snapshot (refused while forks depend on it)."""
    run(manager(ctx).snapshot_delete(snapshot, instance))
    console.print(f"deleted snapshot {snapshot}")


@snapshot_app.command("restore")
def snapshot_restore(ctx: typer.Context, name: NameArg,
                     snapshot: SnapshotArg) -> None:
    """Replace a (not running) instance's disk and state with one of its snapshots."""
    info = run(manager(ctx).snapshot_restore(name, snapshot))
    console.print(f"{info.name} now holds snapshot {snapshot}: {info.state}"
                  + (f" (run `torpor restore {info.name}`)" if info.state == "standby" else ""))


@snapshot_app.command("fork")
def snapshot_fork(ctx: typer.Context, snapshot: SnapshotArg,
                  new_name: ForkNameArg,
                  count: CountOpt = 1, target: TargetOpt = "running",
                  instance: SourceOpt = None, json_out: JsonOpt = False) -> None:
    """Create new instances from a snapshot."""
    started = time.monotonic()
    backend, state = manager(ctx), target_state(target)
    infos = with_progress(backend, "fork", lambda: backend.snapshot_fork(
        snapshot, new_name, count=count, target_state=state, source=instance))
    print_forks(infos, json_out, started)


RemoteUrlArg = Annotated[str, typer.Argument(
    metavar="URL",
    help="s3://BUCKET/PREFIX; endpoint and credentials from the AWS environment variables"
         " and config files (AWS_ENDPOINT_URL, AWS_PROFILE, AWS_ACCESS_KEY_ID, ...).")]
RemoteSnapshotArg = Annotated[str, typer.Argument(metavar="URL",
                                                  help="s3://BUCKET/PREFIX/SNAPSHOT.")]


@snapshot_app.command("push")
def snapshot_push(ctx: typer.Context, snapshot: SnapshotArg,
                  url: RemoteUrlArg, instance: SourceOpt = None,
                  remote_name: Annotated[str | None, typer.Option(
                      "--name", metavar="NAME",
                      help="Its name in the bucket (default: the snapshot's).",
                      show_default=False)] = None,
                  json_out: JsonOpt = False) -> None:
    """Upload a stored snapshot to S3-compatible storage: only the chunks the bucket does
    not have yet (a second push, or a killed one run again, sends what is missing)."""
    backend = manager(ctx)
    report = with_progress(backend, "push", lambda: backend.snapshot_push(
        snapshot, url, source=instance, remote_name=remote_name))
    if json_out:
        print_json({key: getattr(report, key) for key in
                    ("uploaded_bytes", "total_bytes", "chunks", "skipped_chunks", "seconds")})
        return
    console.print(f"pushed {snapshot} to {report.url}: {format_size(report.uploaded_bytes)}"
                  f" uploaded of {format_size(report.total_bytes)}"
                  f" ({report.skipped_chunks} of {report.chunks} chunks were there already)"
                  f" in {report.seconds:.1f} s")


@snapshot_app.command("pull")
def snapshot_pull(ctx: typer.Context, url: RemoteSnapshotArg,
                  name: Annotated[str | None, typer.Option(
                      "--name", metavar="NAME",
                      help="Its name here (default: its name in the bucket).",
                      show_default=False)] = None,
                  json_out: JsonOpt = False) -> None:
    """Download a snapshot from S3-compatible storage (checked against this host first);
    it appears only once complete and verified."""
    backend = manager(ctx)
    info = with_progress(backend, "pull", lambda: backend.snapshot_pull(url, name=name))
    if json_out:
        print_json(info)
        return
    console.print(f"pulled {url} as snapshot {info.name} ({info.id}): fork it with"
                  f" `torpor snapshot fork {info.name} NEWNAME`")


@snapshot_app.command("remote-list")
def snapshot_remote_list(ctx: typer.Context, url: RemoteUrlArg, json_out: JsonOpt = False
                         ) -> None:
    """List the snapshots pushed to s3://BUCKET/PREFIX."""
    print_listing(run(manager(ctx).remote_list(url)), json_out, "snapshots",
                  remote_snapshots_table)


@snapshot_app.command("remote-delete")
def snapshot_remote_delete(ctx: typer.Context, url: RemoteSnapshotArg,
                           json_out: JsonOpt = False) -> None:
    """Delete a pushed snapshot; its chunks go unless another snapshot there uses them."""
    report = run(manager(ctx).remote_delete(url))
    if json_out:
        print_json(report)
        return
    console.print(f"deleted {url}: {report.removed_chunks} chunks removed,"
                  f" {report.kept_chunks} kept (other snapshots use them)")


def _pull_if_missing(backend: InstanceManager, oci: Any) -> None:
    """In-process, a missing image is pulled here, with the progress bar."""
    from torpor.images.oci import ImageStore

    if ImageStore(backend.data_root).find(oci.reference) is None:
        _pull(backend, oci.reference, oci.insecure)


def _pull(backend: InstanceManager, ref: str, insecure: bool) -> Any:
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), console=err_console, transient=True,
                  disable=not err_console.is_terminal) as bar:
        task = bar.add_task(f"pulling {ref}", total=None)

        def report(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total or None)
        return run(backend.image_pull(ref, insecure=insecure, progress=report))


def _local_manager(ctx: typer.Context) -> InstanceManager:
    """Image commands work on the data root in-process (the image store has its own
    lock), so pulls show their progress bar whether or not a daemon runs."""
    from torpor.manager import InstanceManager

    cfg = config(ctx)
    return InstanceManager(cfg.root.root, cfg.settings())


@image_app.command("pull")
def image_pull(ctx: typer.Context,
               reference: Annotated[str, typer.Argument(metavar="REF", help="e.g. busybox, "
                                                        "ghcr.io/owner/app:1.2")],
               insecure: Annotated[bool, typer.Option(
                   "--insecure", help="Plain HTTP to a registry that is not on loopback.")
               ] = False,
               json_out: JsonOpt = False) -> None:
    """Pull an image from an OCI/Docker registry (linux/amd64; verified by digest)."""
    started = time.monotonic()
    info = _pull(_local_manager(ctx), reference, insecure)
    if json_out:
        print_json(info)
    else:
        console.print(f"pulled {', '.join(info.references)} ({info.digest}) in "
                      f"{time.monotonic() - started:.1f} s")


@image_app.command("import")
def image_import(ctx: typer.Context,
                 path: Annotated[Path, typer.Argument(
                     metavar="PATH",
                     help="A docker-archive or oci-archive tarball, or an OCI layout.")],
                 reference: Annotated[str | None, typer.Option(
                     "--as", metavar="REF", help="The reference to know it by.",
                     show_default=False)] = None,
                 json_out: JsonOpt = False) -> None:
    """Import an image from a file (for hosts without registry access)."""
    info = run(_local_manager(ctx).image_import(path, reference))
    if json_out:
        print_json(info)
    else:
        console.print(f"imported {', '.join(info.references)} ({info.digest})")


@image_app.command("list")
def image_list(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """List the images torpor has, and the instances that use them."""
    print_listing(run(_local_manager(ctx).image_list()), json_out, "images", images_table)


@image_app.command("rm")
def image_rm(ctx: typer.Context,
             reference: Annotated[str, typer.Argument(metavar="REF",
                                                      help="Reference or digest.")]) -> None:
    """Forget an image reference; its data goes with its last one (refused while
    instances use it)."""
    run(_local_manager(ctx).image_remove(reference))
    console.print(f"removed {reference}")


@image_app.command("build")
def image_build() -> None:
    """Build the built-in default guest if its recipe changed (cached)."""
    from torpor.images.builtin import builtin_image_dir, ensure_builtin_image

    image = ensure_builtin_image()
    console.print(f"default guest ready in {builtin_image_dir()} (kernel {image.kernel.name})")


# click's base exception, reached through one typer exports: typer 0.28 carries its own
# copy of click (typer._click), earlier versions use click itself.
ClickException: type[Exception] = next(
    t for t in typer.BadParameter.__mro__ if t.__name__ == "ClickException")


def usage_error_line(exc: Exception) -> str:
    """A usage error (a missing argument, an unknown option, a bad value) in one line, like
    torpor's own errors, with where the command's help is."""
    message = " ".join(str(exc.format_message()).split()).rstrip(".")  # type: ignore[attr-defined]
    message = message[:1].lower() + message[1:]  # "Missing argument": as torpor's own read
    ctx = getattr(exc, "ctx", None)
    where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
    return f"torpor: error: {message}{where}"


def main() -> None:
    # Errors, usage errors too, become one line on stderr with their exit code.
    try:
        code = app(standalone_mode=False)
    except Interrupted as exc:
        print(f"torpor: {exc.message}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except TorporError as exc:
        print(f"torpor: error: {exc.message}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except ClickException as exc:
        # A group called bare has printed its help already (typer does as it raises this)
        if type(exc).__name__ != "NoArgsIsHelpError":
            print(usage_error_line(exc), file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 2))
    except typer.Abort:
        err_console.print("torpor: aborted")
        sys.exit(1)
    except KeyboardInterrupt:  # outside a command (typer makes one inside it exit 130)
        print("torpor: interrupted", file=sys.stderr)
        sys.exit(130)
    # What a command returned, or the code of the typer.Exit it raised (a command's own
    # exit code: `exec`)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
