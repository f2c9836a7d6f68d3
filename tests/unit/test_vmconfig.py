from pathlib import Path

from torpor.hypervisor.vmconfig import (
    DEFERRED,
    Disk,
    MemoryFile,
    PortForward,
    VMConfig,
    render_argv,
)


def config(**over: object) -> VMConfig:
    base: dict[str, object] = dict(
        name="t", cpus=2, memory_mib=512, kernel=Path("/k/vmlinux"), initrd=Path("/k/initrd"),
        cmdline="console=ttyS0", disks=(Disk(path=Path("/d/disk.raw")),),
        mac="52:54:00:aa:bb:cc", qmp_socket=Path("/r/qmp.sock"),
        qmp_query_socket=Path("/r/query.sock"), agent_socket=Path("/r/agent.sock"),
        serial_log=Path("/l/serial.log"))
    base.update(over)
    return VMConfig.model_validate(base)


def test_argv_is_deterministic_and_explicit() -> None:
    argv = render_argv(config())
    # What restore renders from a manifest (the config as JSON, read back) is the argv
    # the VM was started with, down to the order of its arguments.
    assert render_argv(VMConfig.model_validate_json(config().model_dump_json())) == argv
    joined = " ".join(argv)
    assert "-accel tcg,thread=multi" in joined
    assert "-cpu qemu64" in joined and "-cpu host" not in joined
    assert "-smp 2" in joined and "-m 512M" in joined
    assert "mac=52:54:00:aa:bb:cc" in joined
    assert "-netdev user,id=net0" in joined
    assert "name=org.qemu.guest_agent.0" in joined
    assert "unix:/r/qmp.sock,server=on,wait=off" in joined
    assert "unix:/r/query.sock,server=on,wait=off" in joined
    assert "-incoming" not in argv


def test_incoming_kvm_forwards_and_memory_file() -> None:
    argv = render_argv(config(accel="kvm", port_forwards=(PortForward(host_port=2222,
                                                                       guest_port=22),),
                              memory_file=MemoryFile(path=Path("/i/memory"), shared=False)),
                       incoming=DEFERRED)
    joined = " ".join(argv)
    assert argv[-4:-2] == ["-incoming", "defer"]
    assert "-global migration.announce-rounds=0" in joined
    assert "-accel kvm" in joined
    assert "hostfwd=tcp:127.0.0.1:2222-:22" in joined
    assert "memory-backend-file,id=ram0,size=512M,mem-path=/i/memory,share=off" in joined


def test_guest_visible_part_ignores_runtime_paths() -> None:
    a = config()
    b = config(qmp_socket=Path("/elsewhere/q.sock"), serial_log=Path("/x/s.log"))
    assert a.guest_visible() == b.guest_visible()
    assert a.guest_visible() != config(memory_mib=1024).guest_visible()


def test_incoming_from_a_descriptor_at_exec() -> None:
    argv = render_argv(config(), incoming="fd:7")
    assert argv[-5:-2] == ["-S", "-incoming", "fd:7"]


def test_the_identity_port_is_a_pipe_and_guest_visible() -> None:
    with_port = config(identity_pipe=Path("/r/identity"))
    joined = " ".join(render_argv(with_port))
    assert "-chardev pipe,id=identity,path=/r/identity" in joined
    assert "chardev=identity,name=org.torpor.identity" in joined
    assert "org.torpor.identity" not in " ".join(render_argv(config()))
    # A state saved without the port (before it existed) loads only without it.
    saved_before = {k: v for k, v in config().guest_visible().items() if k != "identity_port"}
    assert VMConfig.saved_guest_visible(saved_before) == config().guest_visible()
    assert VMConfig.saved_guest_visible(saved_before) != with_port.guest_visible()
