"""Hosts made of Linux network namespaces, for tests of many hosts on one server.

```
 root namespace                                      host namespaces
 ┌──────────────────────────────┐
 │ valkey-server on 10.77.N.1   │   veth pair           ┌─────────────────────────────┐
 │ bridge jq<tag>br 10.77.N.1/24├── jq<tag>h0 ═══ eth ─┤ host-a 10.77.N.10: a master │
 │                              ├── jq<tag>h1 ═══ eth ─┤ host-b 10.77.N.11: a master │
 └──────────────────────────────┘        ...           └─────────────────────────────┘
```

Every host reaches the server over its own link: ``cut(host)`` sets the root end of its veth
down (packets in both directions are dropped, as by a pulled cable: TCP notices only by its
timeouts), ``heal(host)`` sets it up again. ``kill(host)`` SIGKILLs every process in the
host's namespace at once. Needs root and iproute2's ``ip``; :func:`unavailable` says why not.

Names are unique per run (a random tag; the namespace's name also carries the test process's
pid), :meth:`Network.close` removes every namespace, link and bridge it made, and
:func:`sweep` removes what a run killed before its cleanup left behind.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import psutil
from conftest import kill_processes

#: The first two octets of the private /24s the networks use (10.77.N.0/24).
SUBNET_PREFIX = "10.77"
#: Host addresses start here in their /24: host i is 10.77.N.(HOST_BASE + i).
HOST_BASE = 10
#: Namespaces this module makes are named ``jobq-test-<pid>-<tag>-<host>``.
NS_PREFIX = "jobq-test-"
_NS_RE = re.compile(rf"^{NS_PREFIX}(\d+)-([0-9a-f]{{4}})-")


class NetnsError(RuntimeError):
    """An ``ip`` command failed; the message has its stderr."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc


def unavailable() -> str | None:
    """Why hosts cannot be made here (not root, no ``ip``, namespaces refused), or None."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "making network namespaces needs root (ip netns add)"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"{NS_PREFIX}{os.getpid()}-{secrets.token_hex(2)}-probe"
    made = ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


def sweep() -> None:
    """Remove the namespaces (and their links) of test runs whose process is gone."""
    listed = ip("netns", "list", check=False).stdout.split()
    for name in listed:
        m = _NS_RE.match(name)
        if m and not psutil.pid_exists(int(m.group(1))):
            _kill_pids(_ns_pids(name))
            ip("netns", "del", name, check=False)
            tag = m.group(2)
            for link in _links(f"jq{tag}"):
                ip("link", "del", link, check=False)


def _links(prefix: str) -> list[str]:
    out = ip("-o", "link", "show", check=False).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()
             if ":" in line]
    return [n for n in names if n.startswith(prefix)]


def _ns_pids(ns: str) -> list[int]:
    out = ip("netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _kill_pids(pids: Sequence[int], *, wait: bool = True) -> list[psutil.Process]:
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    kill_processes(procs, wait=wait)
    return procs


def _free_subnet() -> int:
    """A third octet N such that no interface has an address in 10.77.N.0/24."""
    used = set(re.findall(rf"inet {re.escape(SUBNET_PREFIX)}\.(\d+)\.",
                          ip("-o", "-4", "addr", "show", check=False).stdout))
    free = [n for n in range(1, 255) if str(n) not in used]
    if not free:
        raise NetnsError(f"no free /24 in {SUBNET_PREFIX}.0.0/16")
    return free[secrets.randbelow(len(free))]


@dataclass
class Host:
    """One host: a network namespace, the root end of its link, its address."""

    name: str
    ns: str
    link: str  # the veth end in the root namespace (in the bridge)
    address: str

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host's namespace (``ip netns exec`` execs it: the pid
        of the process started is the pid of ``argv[0]``)."""
        return ["ip", "netns", "exec", self.ns, *argv]

    def pids(self) -> list[int]:
        """Every process in the host's namespace."""
        return _ns_pids(self.ns)


@dataclass
class Network:
    """A bridge in the root namespace with the server's address, and hosts linked to it."""

    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    subnet: int = 0
    hosts: list[Host] = field(default_factory=list)
    bridge: str = ""

    @property
    def server_address(self) -> str:
        return f"{SUBNET_PREFIX}.{self.subnet}.1"

    def open(self) -> Network:
        sweep()
        self.subnet = _free_subnet()
        self.bridge = f"jq{self.tag}br"
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.server_address}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        return self

    def add_host(self, name: str) -> Host:
        i = len(self.hosts)
        ns = f"{NS_PREFIX}{os.getpid()}-{self.tag}-{name}"
        host = Host(name, ns, f"jq{self.tag}h{i}",
                    f"{SUBNET_PREFIX}.{self.subnet}.{HOST_BASE + i}")
        self.hosts.append(host)  # before it exists: close() removes a half-made host too
        peer = f"jq{self.tag}n{i}"
        ip("netns", "add", ns)
        ip("link", "add", host.link, "type", "veth", "peer", "name", peer)
        ip("link", "set", peer, "netns", ns)
        ip("link", "set", host.link, "master", self.bridge)
        ip("link", "set", host.link, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "link", "set", peer, "name", "eth0")
        ip("-n", ns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        return host

    def cut(self, host: Host) -> None:
        """Pull the host's cable: nothing passes its link either way until :meth:`heal`."""
        ip("link", "set", host.link, "down")

    def heal(self, host: Host) -> None:
        ip("link", "set", host.link, "up")

    def kill(self, host: Host) -> list[psutil.Process]:
        """SIGKILL every process of the host at once; returns them, without waiting for
        them to die (``conftest.wait_dead``)."""
        return _kill_pids(host.pids(), wait=False)

    def close(self) -> None:
        """Kill every host's processes; delete the namespaces, links and the bridge."""
        for host in self.hosts:
            _kill_pids(host.pids())
            ip("netns", "del", host.ns, check=False)
            ip("link", "del", host.link, check=False)  # gone with its peer, normally
        if self.bridge:
            ip("link", "del", self.bridge, check=False)
        deadline = time.monotonic() + 5
        while _links(f"jq{self.tag}") and time.monotonic() < deadline:
            time.sleep(0.05)  # a namespace's links go when its last process is reaped
