"""Hosts on one machine: network namespaces with their own addresses, joined by a bridge.

Each host is a network namespace holding loopback and one veth end (``lan0``) with an address
in a private /24; the other veth ends are enslaved to a bridge that carries no address. The
hosts have no route but the /24, so nothing they send leaves it, and the machine's own
namespace gets an ``unreachable`` route for the /24, so nothing sent there by mistake (a client
run without entering a host) goes out to the real network either. Processes enter a host with
``nsenter --net`` (``ip netns exec`` would also remount /sys, which breaks slurmd's cgroup
probe). The namespaces share the filesystem and the hostname with the machine, as nodes of a
cluster share a parallel filesystem: every address a program needs must come from
configuration, since the hostname resolves to loopback everywhere.

Every name carries the creating process id, so concurrent test sessions never collide, and
``destroy`` removes namespaces (SIGKILLing what still runs in them), the bridge and the route;
``remove_stale`` does the same for sessions that died without cleaning up.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

SUBNET = "10.213.7.0/24"
LAN_IFNAME = "lan0"  # the interface holding a host's address, inside its namespace
_PREFIX = "vwlmm"


def missing_prerequisites() -> Optional[str]:
    """A sentence saying why namespaces cannot be made here, or None when they can."""
    absent = [b for b in ("ip", "nsenter") if shutil.which(b) is None]
    if absent:
        return (f"{', '.join(absent)} not found (network namespaces need iproute2 and "
                "util-linux)")
    if os.geteuid() != 0:
        return "network namespaces, veth pairs and a bridge need root"
    return None


@dataclass
class Host:
    """One namespace: ``name`` (also the Slurm node name), its address and veth names."""

    name: str
    netns: str
    addr: str
    host_veth: str  # the bridge-side end, in the machine's namespace

    @property
    def enter(self) -> List[str]:
        """Command prefix that runs a program inside this host's network namespace."""
        return ["nsenter", f"--net=/run/netns/{self.netns}", "--"]

    def pids(self) -> List[int]:
        out = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True,
                             text=True).stdout
        return [int(p) for p in out.split()]


@dataclass
class Lan:
    """A bridge and its hosts (see the module docstring); ``lan[name]`` is a Host."""

    bridge: str
    subnet: str
    hosts: Dict[str, Host] = field(default_factory=dict)

    @property
    def guard_route(self) -> List[str]:
        """The machine's unreachable route for the subnet; its metric (our PID) tells it from
        the routes of concurrent sessions."""
        return ["unreachable", self.subnet, "metric", str(os.getpid())]

    @classmethod
    def create(cls, names: Sequence[str], subnet: str = SUBNET, first: int = 10) -> "Lan":
        """Hosts ``names`` at ``subnet`` addresses first, first+1, ... (a /24 of our own)."""
        remove_stale()
        tag = f"{_PREFIX}{os.getpid()}"
        net = ipaddress.ip_network(subnet)
        lan = cls(bridge=f"vwbr{os.getpid()}", subnet=str(net))
        try:
            _ip("route", "add", *lan.guard_route)
            _ip("link", "add", lan.bridge, "type", "bridge")
            _ip("link", "set", lan.bridge, "up")
            for i, name in enumerate(names):
                host = Host(name=name, netns=f"{tag}-{name}", addr=str(net[first + i]),
                            host_veth=f"vw{os.getpid()}h{i}")
                lan.hosts[name] = host
                _ip("netns", "add", host.netns)
                _ip("link", "add", host.host_veth, "type", "veth", "peer", "name", "vwtmp",
                    "netns", host.netns)
                _ip("link", "set", host.host_veth, "master", lan.bridge, "up")
                _ip("-n", host.netns, "link", "set", "vwtmp", "name", LAN_IFNAME)
                _ip("-n", host.netns, "addr", "add", f"{host.addr}/{net.prefixlen}", "dev",
                    LAN_IFNAME)
                _ip("-n", host.netns, "link", "set", LAN_IFNAME, "up")
                _ip("-n", host.netns, "link", "set", "lo", "up")
        except BaseException:
            lan.destroy()
            raise
        return lan

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def cut(self, name: str) -> None:
        """Unplug a host's cable: its packets go nowhere, and nothing (no FIN, no RST) comes
        back, as when a node loses power."""
        _ip("link", "set", self.hosts[name].host_veth, "down")

    def plug(self, name: str) -> None:
        _ip("link", "set", self.hosts[name].host_veth, "up")

    def kill_all(self, name: str, spare: Sequence[str] = (), timeout: float = 10.0
                 ) -> List[int]:
        """SIGKILL every process inside a host's namespace but those whose name (comm) is in
        ``spare``; returns their PIDs."""
        host = self.hosts[name]
        killed: List[int] = []
        deadline = time.monotonic() + timeout
        while True:
            pids = [p for p in host.pids() if _comm(p) not in spare]
            if not pids:
                return killed
            if time.monotonic() > deadline:
                raise TimeoutError(f"processes {pids} in {host.netns} survive SIGKILL")
            for pid in pids:
                _kill(pid)
            killed += [p for p in pids if p not in killed]
            time.sleep(0.1)

    def destroy(self) -> None:
        """Kill what runs in the namespaces, delete them, the bridge and the route (idempotent;
        everything is removed even when a process will not die, which is then raised)."""
        survivors: List[TimeoutError] = []
        for name, host in self.hosts.items():
            if os.path.exists(f"/run/netns/{host.netns}"):
                try:
                    self.kill_all(name)
                except TimeoutError as exc:
                    survivors.append(exc)
                subprocess.run(["ip", "netns", "del", host.netns], capture_output=True)
            subprocess.run(["ip", "link", "del", host.host_veth], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        subprocess.run(["ip", "route", "del", *self.guard_route], capture_output=True)
        if survivors:
            raise survivors[0]


def remove_stale() -> List[str]:
    """Delete namespaces and bridges left by test sessions that died without cleaning up
    (their creator PID is gone); returns what was removed."""
    removed = []
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for ns in re.findall(rf"^({_PREFIX}(\d+)-\S+)", listing, flags=re.M):
        if not _pid_alive(int(ns[1])):
            for pid in subprocess.run(["ip", "netns", "pids", ns[0]], capture_output=True,
                                      text=True).stdout.split():
                _kill(int(pid))
            subprocess.run(["ip", "netns", "del", ns[0]], capture_output=True)
            removed.append(ns[0])
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    for name, pid in re.findall(r"^\d+: (vwbr(\d+)):", links, flags=re.M):
        if not _pid_alive(int(pid)):
            subprocess.run(["ip", "link", "del", name], capture_output=True)
            removed.append(name)
    routes = subprocess.run(["ip", "route", "show", "type", "unreachable"], capture_output=True,
                            text=True).stdout
    for subnet, pid in re.findall(r"^unreachable (\S+) metric (\d+)", routes, flags=re.M):
        if subnet == SUBNET and not _pid_alive(int(pid)):
            subprocess.run(["ip", "route", "del", "unreachable", subnet, "metric", pid],
                           capture_output=True)
            removed.append(f"route unreachable {subnet} metric {pid}")
    return removed


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _ip(*args: str) -> None:
    res = subprocess.run(["ip", *args], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")
