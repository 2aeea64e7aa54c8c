"""Hosts in network namespaces: create them, shape their links, partition, tear down.

One network is a set of hosts, each a namespace ``<prefix>-<host>`` whose only interface
is a tun device ``eth0`` with one address of 198.18.0.0/15 (RFC 2544's benchmarking
range, routed nowhere): the hosts get 198.18.1.1, 198.18.1.2, ... and no default route,
so a host can send to the testnet's addresses only, and nothing else on the machine sees
its traffic. The relay process (wire.py, one per network) holds every tun and carries
each packet through the link model (links.py); it is the only thing outside the
namespaces. ``DIR/net.json`` (written before anything is created) names the prefix, the
hosts, their shapes, the partition and the relay's pid.

Teardown finds what to remove by prefix as well as from ``net.json``: every namespace
whose name starts with ``<prefix>-`` (and the processes inside it, from ``ip netns
pids``), and every relay started with that prefix (from /proc), so a ``testnet up`` killed
halfway leaves nothing behind a ``testnet down``. It is idempotent.

Hosts behind a NAT (issue 17, item 2) hook in at ``create_network``: a NAT gateway is
one more host of the network (its public side a tun like any host's), and the hosts
behind it are namespaces joined to the gateway's namespace by veth pairs, on addresses
of 198.19.0.0/16, named with the same prefix so that teardown removes them too.

Needs root, iproute2's ``ip`` and /dev/net/tun; ``check_available`` says which is missing.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from node.testnet.links import LinkShape

STATE_FILE = "net.json"
STATS_FILE = "wire-stats.json"
WIRE_LOG = "wire.log"
TESTNET_RANGE = ipaddress.ip_network("198.18.0.0/15")
FIRST_HOST = ipaddress.IPv4Address("198.18.1.1")
MAX_HOSTS = 250
TUN_NAME = "eth0"
NETNS_DIR = Path("/var/run/netns")
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")
_HOST_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")
_CLONE_NEWNET = 0x40000000
_TUNSETIFF = 0x400454CA
_IFF_TUN, _IFF_NO_PI = 0x0001, 0x1000

T = TypeVar("T")


class NetnsError(Exception):
    """Setting up or changing the namespace network failed; the message says why."""


@dataclass(frozen=True)
class Host:
    name: str
    netns: str
    addr: ipaddress.IPv4Address


@dataclass
class NetState:
    prefix: str
    hosts: list[Host]
    shapes: dict[str, LinkShape] = field(default_factory=dict)
    groups: list[list[str]] = field(default_factory=list)
    wire_pid: int | None = None
    generation: int = 0  # bumped at each change; the relay echoes it once applied

    def host(self, name: str) -> Host:
        for host in self.hosts:
            if host.name == name:
                return host
        raise NetnsError(f"no host {name!r} in this testnet (hosts: "
                         f"{', '.join(h.name for h in self.hosts)})")

    def to_json(self) -> dict[str, Any]:
        return {"prefix": self.prefix,
                "hosts": [{"name": h.name, "netns": h.netns, "addr": str(h.addr)}
                          for h in self.hosts],
                "shapes": {n: s.to_json() for n, s in self.shapes.items()},
                "groups": self.groups, "wire_pid": self.wire_pid,
                "generation": self.generation}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> NetState:
        return cls(str(obj["prefix"]),
                   [Host(h["name"], h["netns"], ipaddress.IPv4Address(h["addr"]))
                    for h in obj["hosts"]],
                   {n: LinkShape.from_json(s) for n, s in obj.get("shapes", {}).items()},
                   [list(g) for g in obj.get("groups", [])], obj.get("wire_pid"),
                   int(obj.get("generation", 0)))


def load_state(directory: Path) -> NetState:
    try:
        return NetState.from_json(json.loads((directory / STATE_FILE).read_text()))
    except FileNotFoundError:
        raise NetnsError(f"no namespace network in {directory} (no {STATE_FILE})") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise NetnsError(f"{directory / STATE_FILE} is damaged ({exc}); "
                         f"remove it and run iollm testnet down --prefix ...") from None


def save_state(directory: Path, state: NetState) -> None:
    path = directory / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state.to_json(), indent=2) + "\n")
    tmp.replace(path)


def check_available() -> None:
    """Raise NetnsError naming what this machine lacks for a namespace network."""
    if sys.platform != "linux":
        raise NetnsError("network namespaces need Linux")
    if os.geteuid() != 0:
        raise NetnsError("network namespaces need root (run as root, or without --hosts)")
    if shutil.which("ip") is None:
        raise NetnsError("iproute2's `ip` is not installed (apt-get install iproute2)")
    if not os.path.exists("/dev/net/tun"):
        raise NetnsError("/dev/net/tun is missing (the kernel's tun driver)")


def check_prefix(prefix: str) -> str:
    if not _PREFIX_RE.match(prefix):
        raise NetnsError(f"prefix {prefix!r}: 1-12 lowercase letters and digits, "
                         f"starting with a letter")
    return prefix


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def run_in_netns(netns: str, fn: Callable[..., T], *args: Any) -> T:
    """Call ``fn(*args)`` in a thread that has entered namespace ``netns``: what it opens
    (sockets, tun devices) belongs to that namespace; the caller's threads stay where they
    are (a network namespace is a property of the thread, not the process)."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            with open(NETNS_DIR / netns) as handle:
                if _libc().setns(handle.fileno(), _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {netns}: {os.strerror(err)}")
            outcome["value"] = fn(*args)
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    value: T = outcome["value"]
    return value


def _open_tun_here() -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", TUN_NAME.encode(),
                                                 _IFF_TUN | _IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


def open_tun(netns: str) -> int:
    """A non-blocking fd on the host's tun device (created by ``create_network``)."""
    return run_in_netns(netns, _open_tun_here)


def tcp_stream_mbit(sender: str, receiver: str, addr: str, nbytes: int, port: int,
                    timeout: float = 120.0, after: int = 0) -> float:
    """One bulk TCP stream of ``nbytes`` from namespace ``sender`` to ``addr:port`` in
    namespace ``receiver``, over their links: the Mbit/s of payload received, from the
    accept to the last byte (what the links and the relay carry, as iperf would say).
    With ``after``, the rate of the bytes past the first ``after`` only: the rate a link
    holds once slow start is over."""
    def listen() -> socket.socket:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((addr, port))
        server.listen(1)
        server.settimeout(timeout)
        return server

    took: list[tuple[float, int]] = []

    def receive(server: socket.socket) -> None:
        with server, server.accept()[0] as conn:
            conn.settimeout(timeout)
            got, start, counted = 0, time.monotonic(), nbytes
            while got < nbytes and (chunk := conn.recv(1 << 20)):
                got += len(chunk)
                if after and got >= after and counted == nbytes:
                    start, counted = time.monotonic(), nbytes - got
            if got == nbytes:
                took.append((time.monotonic() - start, counted))

    server = run_in_netns(receiver, listen)
    reader = threading.Thread(target=receive, args=(server,), daemon=True)
    reader.start()
    with run_in_netns(sender, socket.create_connection, (addr, port), timeout) as conn:
        block = os.urandom(min(nbytes, 1 << 20))
        sent = 0
        while sent < nbytes:
            sent += conn.send(memoryview(block)[:nbytes - sent])
    reader.join(timeout)
    if not took:
        raise NetnsError(f"a TCP stream from {sender} to {receiver} did not arrive whole "
                         f"in {timeout:.0f} s")
    seconds, counted = took[0]
    if counted == 0:  # the read that passed ``after`` was the last: no bytes to time
        raise NetnsError(f"after={after} left no bytes of {nbytes} to time")
    return counted * 8 / seconds / 1e6


def netns_argv(netns: str, argv: list[str]) -> list[str]:
    """The command line that runs ``argv`` inside the host (``ip netns exec`` execs it,
    so the process keeps the pid Popen reports)."""
    return ["ip", "netns", "exec", netns, *argv]


def namespaces(prefix: str) -> list[str]:
    """The namespaces this prefix owns, running or left over."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(f"{prefix}-"))


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs. A child of this process (a testnet brought up and
    taken down by one program) stays a zombie, which kill(pid, 0) finds, until reaped:
    reap it first; another's zombie is reaped by init."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def netns_pids(netns: str) -> list[int]:
    """The processes running inside the namespace."""
    done = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True,
                          timeout=30)
    return [int(p) for p in done.stdout.split() if p.isdigit()]


def _wire_pids(prefix: str) -> list[int]:
    """Relays started for this prefix, found in /proc (net.json may never have been
    written if ``up`` was killed early)."""
    found = []
    marker = b"node.testnet.wire\0--dir\0"
    tail = f"--prefix\0{prefix}\0".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if marker in cmdline and tail in cmdline:
            found.append(int(entry))
    return found


def _stop(pids: Iterable[int], grace: float) -> int:
    """SIGTERM, then SIGKILL after ``grace`` seconds; returns how many had to be killed."""
    pids = [p for p in pids if pid_alive(p)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.05)  # waiting on other processes' exit, bounded by the deadline
    killed = [p for p in pids if pid_alive(p)]
    for pid in killed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(killed)


@dataclass
class Teardown:
    namespaces: list[str]
    processes: int
    killed: int


def teardown(prefix: str, directory: Path | None = None, grace: float = 10.0) -> Teardown:
    """Remove every namespace of ``prefix`` with the processes in it, and its relay."""
    check_prefix(prefix)
    processes = killed = 0
    in_hosts = [pid for ns in namespaces(prefix) for pid in netns_pids(ns)]
    processes += len(in_hosts)
    killed += _stop(in_hosts, grace)
    wires = set(_wire_pids(prefix))
    if directory is not None and (directory / STATE_FILE).exists():
        try:
            pid = load_state(directory).wire_pid
        except NetnsError:
            pid = None
        if pid is not None and pid in set(_wire_pids(prefix)):
            wires.add(pid)
    processes += len(wires)
    killed += _stop(wires, 2.0)
    removed = []
    for ns in namespaces(prefix):
        _ip("netns", "del", ns)
        removed.append(ns)
    if directory is not None:
        (directory / STATE_FILE).unlink(missing_ok=True)
    return Teardown(removed, processes, killed)


def _wait_generation(directory: Path, state: NetState, timeout: float) -> None:
    """Wait until the relay has applied ``state`` (it echoes the generation)."""
    deadline = time.monotonic() + timeout
    path = directory / STATS_FILE
    while time.monotonic() < deadline:
        try:
            if json.loads(path.read_text()).get("generation") == state.generation:
                return
        except (FileNotFoundError, ValueError):
            pass
        if state.wire_pid is None or not pid_alive(state.wire_pid):
            raise NetnsError(f"the testnet's relay is not running; see {directory / WIRE_LOG}")
        time.sleep(0.02)  # the relay runs in another process; bounded by the deadline
    raise NetnsError(f"the testnet's relay did not apply the change in {timeout:.0f} s")


def create_network(directory: Path, prefix: str, names: list[str],
                   shapes: dict[str, LinkShape] | None = None,
                   timeout: float = 30.0) -> NetState:
    """Create one namespace per name, each with its tun and address, and start the relay.
    Refuses when namespaces of ``prefix`` exist already (a testnet running or left over)."""
    check_available()
    check_prefix(prefix)
    if not 1 <= len(names) <= MAX_HOSTS:
        raise NetnsError(f"a namespace network has 1 to {MAX_HOSTS} hosts")
    for name in names:
        if not _HOST_RE.match(name):
            raise NetnsError(f"host name {name!r}: lowercase letters, digits and dashes")
    if len(set(names)) != len(names):
        raise NetnsError("host names must differ")
    if left := namespaces(prefix):
        raise NetnsError(f"namespaces of prefix {prefix!r} exist already ({', '.join(left)}); "
                         f"iollm testnet down --prefix {prefix} removes them")
    directory.mkdir(parents=True, exist_ok=True)
    hosts = [Host(n, f"{prefix}-{n}", FIRST_HOST + i) for i, n in enumerate(names)]
    state = NetState(prefix, hosts, dict(shapes or {}), generation=1)
    for name in state.shapes:
        state.host(name)
    save_state(directory, state)  # first, so that teardown knows the directory's prefix
    netmask = TESTNET_RANGE.prefixlen
    try:
        for host in hosts:
            _ip("netns", "add", host.netns)
            _ip("-n", host.netns, "link", "set", "lo", "up")
            _ip("-n", host.netns, "tuntap", "add", "dev", TUN_NAME, "mode", "tun")
            _ip("-n", host.netns, "addr", "add", f"{host.addr}/{netmask}", "dev", TUN_NAME)
            _ip("-n", host.netns, "link", "set", TUN_NAME, "up")
        log = open(directory / WIRE_LOG, "ab")  # noqa: SIM115 - handed to the relay
        try:
            wire = subprocess.Popen(
                [sys.executable, "-m", "node.testnet.wire", "--dir", str(directory.resolve()),
                 "--prefix", prefix], stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            log.close()
        state.wire_pid = wire.pid
        save_state(directory, state)
        _wait_generation(directory, state, timeout)
    except BaseException:
        teardown(prefix, directory)
        raise
    return state


def _change(directory: Path, update: Callable[[NetState], None], timeout: float) -> NetState:
    state = load_state(directory)
    update(state)
    state.generation += 1
    save_state(directory, state)
    if state.wire_pid is None or not pid_alive(state.wire_pid):
        raise NetnsError(f"the testnet's relay is not running; see {directory / WIRE_LOG}")
    os.kill(state.wire_pid, signal.SIGHUP)
    _wait_generation(directory, state, timeout)
    return state


def shape(directory: Path, names: list[str], link: LinkShape,
          timeout: float = 10.0) -> NetState:
    """Give the named hosts' links ``link`` (an unshaped LinkShape() clears them).

    TCP connections already open learn a new shape as a real path's change: BBR (this
    machine's default congestion control, and the namespaces inherit it) keeps the lowest
    round trip it saw for 10 s and sizes its window from it, so a connection opened on an
    unshaped link and then given 25 ms each way ran at 5 Mbit/s of 100 for up to 10 s.
    To measure throughput, shape before the nodes connect (``testnet_up``'s ``shapes``)
    and change a link's rate, not its delay, under live connections."""
    def update(state: NetState) -> None:
        for name in names:
            state.host(name)
            state.shapes[name] = link
    return _change(directory, update, timeout)


def partition(directory: Path, groups: list[list[str]], timeout: float = 10.0) -> NetState:
    """Cut traffic between groups of hosts; hosts named in no group form one more group."""
    def update(state: NetState) -> None:
        seen: set[str] = set()
        for group in groups:
            for name in group:
                state.host(name)
                if name in seen:
                    raise NetnsError(f"host {name} is in two groups")
                seen.add(name)
        state.groups = [list(g) for g in groups]
    return _change(directory, update, timeout)


def heal(directory: Path, timeout: float = 10.0) -> NetState:
    """Restore traffic between every pair of hosts."""
    def update(state: NetState) -> None:
        state.groups = []
    return _change(directory, update, timeout)
