"""The bridge's rules (nftables): guests reach the outside through NAT, and nothing of
the host but DNS and ICMP; nothing outside reaches a guest unless it answers a
connection the guest made (published ports are connected to from the host itself).
Between guests: every TAP is an isolated bridge port (host.py), except those of
instances that opted in to peer traffic; those are in the `peers` set of the bridge
table here, which lets a peer reach only other peers (an isolated port may still reach a
non-isolated one, so the kernel's flag alone would open every guest to a peer).
Two tables per bridge (inet, bridge), replaced whole by one `nft -f` transaction (atomic:
a reader sees the old rules or the new, never a mix). The ruleset is declared here and
handed to nft as text; nothing parses nft's output."""

from __future__ import annotations

import subprocess
from pathlib import Path

from torpor.errors import OperationFailed

IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


def table_name(bridge: str) -> str:
    return "torpor_" + bridge.replace("-", "_").replace(".", "_")


def ruleset(bridge: str, subnet: str, *, nat: bool = True,
            peers: tuple[str, ...] = ()) -> str:
    table = table_name(bridge)
    elements = f"        elements = {{ {', '.join(peers)} }}\n" if peers else ""
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
        # Between two guests: the bridge decides (isolated ports, the peers table); a
        # host with br_netfilter passes bridged IPv4 through here as well.
        iifname "{bridge}" oifname "{bridge}" accept
        iifname "{bridge}" accept
        oifname "{bridge}" ct state established,related accept
        oifname "{bridge}" drop
    }}
    chain postrouting {{
        type nat hook postrouting priority 100; policy accept;
{masquerade}    }}
}}
table bridge {table}
delete table bridge {table}
table bridge {table} {{
    set peers {{
        type ifname
{elements}    }}
    chain forward {{
        # Before br_netfilter's hook at 0, which (when loaded) re-enters the chain
        # after itself and so skips other hooks of its own priority.
        type filter hook forward priority -200; policy accept;
        iifname @peers oifname != @peers drop
        oifname @peers iifname != @peers drop
    }}
}}
"""


def _nft(script: str, what: str) -> None:
    result = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True,
                            text=True, check=False)
    if result.returncode != 0:
        raise OperationFailed(f"{what} failed: " + " ".join(result.stderr.split())[-400:])


def apply(bridge: str, subnet: str, *, nat: bool = True, peers: tuple[str, ...] = ()) -> None:
    """The bridge's tables, as declared (`peers`: the TAPs of instances that allow peer
    traffic)."""
    _nft(ruleset(bridge, subnet, nat=nat, peers=peers), f"setting up the rules of bridge {bridge}")
    if nat and IP_FORWARD.read_text().strip() != "1":
        IP_FORWARD.write_text("1\n")  # NAT needs the host to forward


def add_peer(bridge: str, tap: str) -> None:
    _nft(f"add element bridge {table_name(bridge)} peers {{ {tap} }}\n",
         f"letting {tap} reach its peers")


def remove_peer(bridge: str, tap: str) -> None:
    subprocess.run(["nft", "delete", "element", "bridge", table_name(bridge), "peers",
                    f"{{ {tap} }}"], capture_output=True, check=False)


def present(bridge: str) -> bool:
    """Both tables are there (a firewall reload or `nft flush ruleset` removes them)."""
    return all(subprocess.run(["nft", "list", "table", family, table_name(bridge)],
                              capture_output=True, check=False).returncode == 0
               for family in ("inet", "bridge"))


def remove(bridge: str) -> None:
    for family in ("inet", "bridge"):
        subprocess.run(["nft", "delete", "table", family, table_name(bridge)],
                       capture_output=True, check=False)
