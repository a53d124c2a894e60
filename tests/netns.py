"""Separate Linux network namespaces joined by a bridge: one "host" per party, for real
multi-host runs on one machine (iproute2; needs root, or CAP_NET_ADMIN + CAP_SYS_ADMIN).

Each host gets its own namespace with `lo` up and one veth link (`eth0`, its own IPv4
address) to a bridge in a hub namespace. `Network.cut(host)` takes the host's side of
its link down (a pulled cable: its packets go nowhere, the peers see no carrier) and
`restore(host)` brings it back. Everything is created under names unique to this run
and removed on exit, whatever happened: processes started with `spawn` are killed first.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

SUBNET = "10.213.0"  # /24 inside the namespaces only: it never meets the host's routes
_BRIDGE = "br0"
_LINK = "eth0"


class NetnsUnavailable(Exception):
    """This machine cannot build namespaces here (not root, no iproute2, no veth/bridge)."""


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], check=False, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")


def probe() -> None:
    """Create and delete a namespace holding a veth pair and a bridge; NetnsUnavailable if that fails."""
    if shutil.which("ip") is None:
        raise NetnsUnavailable("iproute2's `ip` command is not installed")
    name = f"eflprobe{os.getpid()}"
    try:
        _ip("netns", "add", name)
    except RuntimeError as exc:
        raise NetnsUnavailable(
            f"cannot create a network namespace (needs root or CAP_SYS_ADMIN, uid is {os.geteuid()}): {exc}"
        ) from None
    try:
        _ip("-n", name, "link", "add", "pa", "type", "veth", "peer", "name", "pb")
        _ip("-n", name, "link", "add", "pbr", "type", "bridge")
    except RuntimeError as exc:
        raise NetnsUnavailable(f"cannot create veth links or bridges: {exc}") from None
    finally:
        _ip("netns", "del", name)


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]


@dataclass
class Network:
    """The hosts of one test run; build it with `network()`."""

    prefix: str
    addresses: dict[str, str] = field(default_factory=dict)  # host -> IPv4 address
    processes: list[Process] = field(default_factory=list)
    _created: list[str] = field(default_factory=list)  # namespaces to delete

    def _add_namespace(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._created.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    @property
    def hub(self) -> str:
        return f"{self.prefix}-hub"

    def namespace(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def _add_host(self, index: int, host: str) -> None:
        ns = self.namespace(host)
        self._add_namespace(ns)
        self.addresses[host] = f"{SUBNET}.{index + 1}"
        hub_side = f"vh{index}"
        # Created inside the namespaces, so the names cannot clash with the host's links.
        _ip("-n", ns, "link", "add", _LINK, "type", "veth", "peer", "name", hub_side, "netns", self.hub)
        _ip("-n", ns, "addr", "add", f"{self.addresses[host]}/24", "dev", _LINK)
        _ip("-n", ns, "link", "set", _LINK, "up")
        _ip("-n", self.hub, "link", "set", hub_side, "master", _BRIDGE)
        _ip("-n", self.hub, "link", "set", hub_side, "up")

    def cut(self, host: str) -> None:
        """Pull `host`'s cable: its side of the link goes down."""
        _ip("-n", self.namespace(host), "link", "set", _LINK, "down")

    def restore(self, host: str) -> None:
        _ip("-n", self.namespace(host), "link", "set", _LINK, "up")

    def spawn(self, host: str, command: Sequence[str], log_path: Path, env: dict[str, str]) -> Process:
        """Run `command` inside `host`'s namespace, stdout and stderr to `log_path`."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(log_path, "ab")  # noqa: SIM115 - closed in teardown
        popen = subprocess.Popen(
            ["ip", "netns", "exec", self.namespace(host), *command],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        process = Process(host, popen, log_path, log_file)
        self.processes.append(process)
        return process

    def _teardown(self) -> list[str]:
        problems: list[str] = []
        try:
            for process in self.processes:
                if process.popen.poll() is None:
                    os.killpg(process.popen.pid, signal.SIGKILL)  # the party and anything it started
                process.popen.wait(timeout=30)
                process.log_file.close()
        finally:
            problems += self._delete_namespaces()
        return problems

    def _delete_namespaces(self) -> list[str]:
        problems: list[str] = []
        for ns in reversed(self._created):
            # Deleting a namespace deletes the veth ends in it, and so their peers.
            done = subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True, text=True, timeout=30)
            if done.returncode != 0:
                problems.append(f"ip netns del {ns}: {done.stderr.strip()}")
        return problems


@contextmanager
def network(hosts: Sequence[str]) -> Iterator[Network]:
    """Namespaces for `hosts` on one bridge; torn down (processes killed first) on exit."""
    if len(hosts) > 250:
        raise ValueError(f"at most 250 hosts on {SUBNET}.0/24, got {len(hosts)}")
    net = Network(prefix=f"efl{os.getpid()}-{secrets.token_hex(2)}")
    try:
        net._add_namespace(net.hub)
        _ip("-n", net.hub, "link", "add", _BRIDGE, "type", "bridge")
        _ip("-n", net.hub, "link", "set", _BRIDGE, "up")
        for index, host in enumerate(hosts):
            net._add_host(index, host)
        yield net
    finally:
        problems = net._teardown()
        if problems:
            raise RuntimeError("network namespace teardown: " + "; ".join(problems))
