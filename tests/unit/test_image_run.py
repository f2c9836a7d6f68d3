"""What an image instance runs: the image's config with the create request's overrides
(Docker's rules), its User resolved against the image's own accounts, and the shell
fragment init reads, which must pass every argument through unchanged."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from torpor.errors import InvalidArgument
from torpor.images.imagedisk import Accounts, render_run_config, resolve_run
from torpor.images.oci import ImageConfig, ImageRecord

ACCOUNTS = Accounts(
    passwd=[["root", "x", "0", "0", "root", "/root", "/bin/sh"],
            ["app", "x", "1000", "1001", "", "/home/app", "/bin/sh"]],
    group=[["root", "x", "0", ""], ["apps", "x", "1001", ""], ["video", "x", "44", "app,x"]])


def image(**config: object) -> ImageRecord:
    return ImageRecord(digest="sha256:" + "a" * 64, references=["r/x:1"], size=1,
                       added_at=datetime.now(UTC), config=ImageConfig(**config))  # type: ignore[arg-type]


def test_overrides_follow_docker() -> None:
    record = image(entrypoint=["/entry"], cmd=["serve", "--port", "80"], env=["A=1", "B=2"],
                   workdir="/srv")
    assert resolve_run(record, ACCOUNTS).argv == ["/entry", "serve", "--port", "80"]
    assert resolve_run(record, ACCOUNTS, cmd=["other"]).argv == ["/entry", "other"]
    # a new entrypoint drops the image's command unless one is given
    assert resolve_run(record, ACCOUNTS, entrypoint=["/bin/sh"]).argv == ["/bin/sh"]
    assert resolve_run(record, ACCOUNTS, entrypoint=["/bin/sh"], cmd=["-c", "x"]).argv == \
        ["/bin/sh", "-c", "x"]
    spec = resolve_run(record, ACCOUNTS, env=["B=3", "C=x=y"], workdir="/tmp")
    assert spec.env[:3] == ["A=1", "B=3", "C=x=y"] and spec.workdir == "/tmp"
    assert "HOME=/root" in spec.env and any(e.startswith("PATH=/usr/local/sbin") for e in spec.env)
    with pytest.raises(InvalidArgument, match="has no Entrypoint or Cmd"):
        resolve_run(image(), ACCOUNTS)
    with pytest.raises(InvalidArgument, match="KEY=VALUE"):
        resolve_run(record, ACCOUNTS, env=["NOVALUE"])


@pytest.mark.parametrize(("user", "expected"), [
    ("app", (1000, 1001, [44], "HOME=/home/app")),
    ("1000", (1000, 1001, [44], "HOME=/home/app")),
    ("app:root", (1000, 0, [44], "HOME=/home/app")),
    ("4242", (4242, 0, [], "HOME=/")),
    ("4242:4343", (4242, 4343, [], "HOME=/")),
    ("", (0, 0, [], "HOME=/root")),
])
def test_user_forms_resolve_against_the_image(user: str,
                                              expected: tuple[int, int, list[int], str]) -> None:
    spec = resolve_run(image(cmd=["x"], user=user), ACCOUNTS)
    assert (spec.uid, spec.gid, spec.groups, next(e for e in spec.env
                                                  if e.startswith("HOME="))) == expected


@pytest.mark.parametrize("user", ["nobody", "app:nogroup"])
def test_unknown_names_are_refused(user: str) -> None:
    with pytest.raises(InvalidArgument, match="is not in the image's"):
        resolve_run(image(cmd=["x"]), ACCOUNTS, user=user)


def test_the_run_config_passes_arguments_and_values_through_unchanged(tmp_path: Path) -> None:
    """Sourced by a real shell (busybox sh, as in the guest), with the exec'd programs
    replaced by a printer: every argument and variable arrives byte for byte."""
    tricky = ["it's", 'say "hi"', "$HOME", "a b", "`id`", "*", "", "back\\slash"]
    spec = resolve_run(image(env=["Q=it's $x"]), ACCOUNTS, entrypoint=["/p"], cmd=tricky)
    config = render_run_config(spec, "host-1").replace("/.torpor/bin/env", "printf '[%s]\\n'")
    script = tmp_path / "config.sh"
    script.write_text(config)
    out = subprocess.run(["busybox", "sh", "-c", f". {script}; run_main"], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout
    printed = [line[1:-1] for line in out.splitlines()]
    assert printed[0] == "-i" and "Q=it's $x" in printed and "HOSTNAME=host-1" in printed
    assert printed[-len(tricky) - 1:] == ["/p", *tricky]
