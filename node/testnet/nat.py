"""Hosts behind a NAT in the namespace testnet (``iollm testnet up --hosts --nat N``).

The gateway is one more host of the network (netns.py: its public side is a tun like any
host's, on 198.18.0.0/15). The hosts behind it are namespaces ``<prefix>-<name>`` joined
to a bridge in the gateway's namespace by veth pairs, on 198.19.k.0/24 for gateway k
(inside the testnet's 198.18.0.0/15 and routed nowhere else): the gateway is 198.19.k.1
and their default route. The gateway masquerades what they send out of its tun (iptables, like a
home router: the source port is kept where it is free) and forwards from its tun to them
only packets of connections they opened (conntrack ESTABLISHED/RELATED); everything else
coming in is dropped, so nothing outside can open a connection to a host behind it.

Everything lives in namespaces named with the testnet's prefix, so ``netns.teardown``
removes it with them (the veths, the bridge and the iptables rules go with their
namespace). Needs ``iptables`` (Debian: apt-get install iptables) besides iproute2.
"""

from __future__ import annotations

import ipaddress
import shutil
import subprocess

from node.testnet.netns import Host, NetnsError, _ip, check_prefix

BRIDGE = "natbr0"
MAX_BEHIND = 200


def _in_netns(netns: str, *argv: str) -> None:
    done = subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True,
                          text=True, timeout=30)
    if done.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} in {netns}: {done.stderr.strip() or done.returncode}")


def check_nat_available() -> None:
    if shutil.which("iptables") is None:
        raise NetnsError("--nat needs iptables (apt-get install iptables)")


def add_nat(prefix: str, gateway: Host, names: list[str], index: int = 0) -> list[Host]:
    """Put hosts ``names`` behind ``gateway`` (a host of the network already created);
    returns them, each with its namespace and its address behind the NAT. Gateway
    ``index`` k uses 198.19.k.0/24 (several NATs in one network, each its own LAN)."""
    check_prefix(prefix)
    check_nat_available()
    if not 1 <= len(names) <= MAX_BEHIND:
        raise NetnsError(f"1 to {MAX_BEHIND} hosts behind a NAT")
    if not 0 <= index <= 255:
        raise NetnsError("a NAT gateway index is 0 to 255")
    lan = ipaddress.IPv4Network(f"198.19.{index}.0/24")
    inside_gw = lan.network_address + 1
    gw = gateway.netns
    _ip("-n", gw, "link", "add", BRIDGE, "type", "bridge")
    _ip("-n", gw, "addr", "add", f"{inside_gw}/{lan.prefixlen}", "dev", BRIDGE)
    _ip("-n", gw, "link", "set", BRIDGE, "up")
    _in_netns(gw, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
    _in_netns(gw, "iptables", "-t", "nat", "-A", "POSTROUTING", "-s", str(lan),
              "-o", "eth0", "-j", "MASQUERADE")
    _in_netns(gw, "iptables", "-A", "FORWARD", "-i", "eth0", "-o", BRIDGE, "-m", "conntrack",
              "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT")
    _in_netns(gw, "iptables", "-A", "FORWARD", "-i", "eth0", "-o", BRIDGE, "-j", "DROP")
    hosts = []
    for i, name in enumerate(names):
        netns = f"{prefix}-{name}"
        addr = inside_gw + 1 + i
        outside, inside = f"nat{i}", "eth0"
        _ip("netns", "add", netns)
        _ip("-n", netns, "link", "set", "lo", "up")
        _ip("-n", gw, "link", "add", outside, "type", "veth", "peer", "name", inside,
            "netns", netns)
        _ip("-n", gw, "link", "set", outside, "master", BRIDGE)
        _ip("-n", gw, "link", "set", outside, "up")
        _ip("-n", netns, "addr", "add", f"{addr}/{lan.prefixlen}", "dev", inside)
        _ip("-n", netns, "link", "set", inside, "up")
        _ip("-n", netns, "route", "add", "default", "via", str(inside_gw))
        hosts.append(Host(name, netns, addr))
    return hosts
