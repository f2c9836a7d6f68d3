"""The bridge's rules (nftables): guests reach the outside through NAT, and nothing of
the host but DNS and ICMP; nothing outside reaches a guest unless it answers a
connection the guest made (published ports are connected to from the host itself).
One table per bridge, replaced whole by one `nft -f` transaction (atomic: a reader sees
the old rules or the new, never a mix). The ruleset is declared here and handed to nft
as text; nothing parses nft's output."""

from __future__ import annotations

import subprocess
from pathlib import Path

from torpor.errors import OperationFailed

IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


def table_name(bridge: str) -> str:
    return "torpor_" + bridge.replace("-", "_").replace(".", "_")


def ruleset(bridge: str, subnet: str, *, nat: bool = True) -> str:
    table = table_name(bridge)
    masquerade = (f"        ip saddr {subnet} oifname != \"{bridge}\" masquerade\n"
                  if nat else "")
    return f"""table inet {table}
delete table inet {table}
table inet {table} {{
    chain input {{
        type filter hook input priority 0; policy accept;
        iifname "{bridge}" ct state established,related accept
        iifname "{bridge}" udp dport 53 accept
        iifname "{bridge}" tcp dport 53 accept
        iifname "{bridge}" meta l4proto {{ icmp, ipv6-icmp }} accept
        iifname "{bridge}" drop
    }}
    chain forward {{
        type filter hook forward priority 0; policy accept;
        iifname "{bridge}" oifname "{bridge}" drop
        iifname "{bridge}" accept
        oifname "{bridge}" ct state established,related accept
        oifname "{bridge}" drop
    }}
    chain postrouting {{
        type nat hook postrouting priority 100; policy accept;
{masquerade}    }}
}}
"""


def apply(bridge: str, subnet: str, *, nat: bool = True) -> None:
    result = subprocess.run(["nft", "-f", "-"], input=ruleset(bridge, subnet, nat=nat),
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise OperationFailed(f"setting up the rules of bridge {bridge} failed: "
                              + " ".join(result.stderr.split())[-400:])
    if nat and IP_FORWARD.read_text().strip() != "1":
        IP_FORWARD.write_text("1\n")  # NAT needs the host to forward


def remove(bridge: str) -> None:
    subprocess.run(["nft", "delete", "table", "inet", table_name(bridge)],
                   capture_output=True, check=False)
