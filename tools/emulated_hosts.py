#!/usr/bin/env python3
"""Emulated hosts on one Linux machine: network namespaces joined by a bridge, each with its
own host name and, optionally, a rate-limited link. MPICH's mpiexec launches into them as
if they were separate machines, so a multi-host run (hosts counted by name, jax's
coordinator found by host name, MPI between hosts over TCP instead of shared memory) can
be tested and measured anywhere; MPI between hosts then goes over TCP through the
(optionally rate-limited) link. Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN).

    python tools/emulated_hosts.py up 2 --rate 1gbit     # hosts ddl-host0, ddl-host1
    mpiexec -launcher ssh -launcher-exec tools/emulated_hosts.py \\
        -hosts 10.213.77.1,10.213.77.2 -ppn 1 python examples/train.py --host-devices 4
    python tools/emulated_hosts.py down 10.213.77.1,10.213.77.2

Each `up` makes an instance of its own, so concurrent runs never touch each other's
hosts: the first free instance k gets the subnet 10.213.(77 + k) and a bridge, and its
host i is the namespace ddl<k>-host<i> with address 10.213.(77 + k).(i + 1) and host name
ddl-host<i>; the machine itself is .254 on the bridge (mpiexec's control connections
reach it there). `down ADDRESSES` removes that instance only; `down` with no argument
removes every instance. mpiexec calls this script as its "ssh" (`-x ADDRESS COMMAND...`);
it runs COMMAND in that host's namespace with the host name set, the way ssh would on a
remote machine. The file system is shared, so the same paths work on every host, as on a
cluster with shared storage.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import pathlib
import re
import shlex
import socket
import subprocess
import sys

NETNS_ETC = pathlib.Path("/etc/netns")
LOCK = pathlib.Path("/tmp/jax_ddl_emulated_hosts.lock")
FIRST_OCTET = 77  # instance k uses the subnet 10.213.(77 + k)
MAX_INSTANCES = 100
NAMESPACE = re.compile(r"^ddl(\d+)-host(\d+)$")


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def subnet(k: int) -> str:
    return f"10.213.{FIRST_OCTET + k}"


def namespace(k: int, i: int) -> str:
    return f"ddl{k}-host{i}"


def bridge(k: int) -> str:
    return f"ddl{k}-br"


def address(k: int, i: int) -> str:
    return f"{subnet(k)}.{i + 1}"


def locate(addr: str) -> tuple[int, int]:
    """(instance, host) of an emulated host's address; ValueError if it is not one."""
    parts = addr.split(".")
    if len(parts) != 4 or parts[:2] != ["10", "213"] or not all(p.isdigit() for p in parts):
        raise ValueError(f"{addr!r} is not an emulated host address (10.213.x.y)")
    k, i = int(parts[2]) - FIRST_OCTET, int(parts[3]) - 1
    if not (0 <= k < MAX_INSTANCES and 0 <= i < 250):
        raise ValueError(f"{addr!r} is not an emulated host address")
    return k, i


def _namespaces() -> list[tuple[str, int]]:
    """(name, instance) of every emulated host namespace on this machine."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    found = []
    for line in listed.splitlines():
        m = NAMESPACE.match(line.split()[0]) if line.split() else None
        if m:
            found.append((m.group(0), int(m.group(1))))
    return found


def _links() -> list[tuple[str, int]]:
    """(name, instance) of the bridges and the hosts' outer veth ends in this namespace."""
    listed = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    found = re.findall(r"^\d+: (ddl(\d+)(?:h\d+)?-br)[:@]", listed, flags=re.M)
    return [(name, int(k)) for name, k in found]


def _bridges() -> set[int]:
    """Instances with a bridge or a host's outer veth end left (a host whose namespace
    was deleted while a process still ran in it keeps its veth until removed)."""
    return {k for _, k in _links()}


def _remove(k: int) -> None:
    for name, instance in _namespaces():
        if instance != k:
            continue
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        etc = NETNS_ETC / name
        if etc.exists():
            for f in etc.iterdir():
                f.unlink()
            etc.rmdir()
    for name, instance in _links():  # the bridge, and veths a busy namespace left
        if instance == k:
            subprocess.run(["ip", "link", "del", name], capture_output=True)


def down(addresses: list[str] | None = None) -> None:
    """Removes the instance the addresses belong to, or every instance if none are given
    (ignores what is not there)."""
    if addresses:
        for k in sorted({locate(a)[0] for a in addresses}):
            _remove(k)
        return
    for k in sorted({k for _, k in _namespaces()} | _bridges()):
        _remove(k)


def up(n: int, rate: str | None = None, delay: str | None = None) -> list[str]:
    """Creates `n` hosts on a bridge of a new instance; `rate` (tc units, e.g. "1gbit")
    limits what each host sends, `delay` (e.g. "0.2ms") adds latency. Returns the hosts'
    addresses."""
    if n < 1 or n > 250:
        raise ValueError(f"between 1 and 250 hosts; got {n}")
    with open(LOCK, "w") as lock:  # concurrent `up`s pick different instances
        fcntl.flock(lock, fcntl.LOCK_EX)
        used = {k for _, k in _namespaces()} | _bridges()
        free = [k for k in range(MAX_INSTANCES) if k not in used]
        if not free:
            raise RuntimeError(f"all {MAX_INSTANCES} instances of emulated hosts are in use")
        k = free[0]
        sh("ip", "link", "add", bridge(k), "type", "bridge")
    try:
        _build(k, n, rate, delay)
    except BaseException:
        _remove(k)
        raise
    return [address(k, i) for i in range(n)]


def _build(k: int, n: int, rate: str | None, delay: str | None) -> None:
    sh("ip", "addr", "add", f"{subnet(k)}.254/24", "dev", bridge(k))
    sh("ip", "link", "set", bridge(k), "up")
    names = "\n".join(f"{address(k, i)} ddl-host{i}" for i in range(n))
    hosts_file = f"127.0.0.1 localhost\n{names}\n{subnet(k)}.254 {socket.gethostname()}\n"
    for i in range(n):
        ns, outside = namespace(k, i), f"ddl{k}h{i}-br"
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "link", "set", outside, "master", bridge(k), "up")
        sh("ip", "-n", ns, "addr", "add", f"{address(k, i)}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        # What the host sends: its link to the others. netem for latency, tbf for rate.
        qdisc = ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0"]
        if delay:
            sh(*qdisc, "root", "handle", "1:", "netem", "delay", delay, "limit", "100000")
        if rate:
            where = ["parent", "1:1"] if delay else ["root"]
            tbf = ["tbf", "rate", rate, "burst", "512kb", "latency", "200ms"]
            sh(*qdisc, *where, "handle", "10:", *tbf)
        (NETNS_ETC / ns).mkdir(parents=True, exist_ok=True)
        (NETNS_ETC / ns / "hosts").write_text(hosts_file)  # ip netns exec mounts it


def launch(argv: list[str]) -> int:
    """mpiexec's ssh: `-x ADDRESS COMMAND...`; runs COMMAND in that host's namespace.

    Like ssh, the words of COMMAND are joined with spaces and run by the remote shell, so
    the launcher's own quoting is kept; what this script adds is quoted for that shell.
    """
    args = list(argv)
    while args and args[0].startswith("-"):
        args.pop(0)
    if len(args) < 2:
        print("emulated_hosts.py: expected ADDRESS COMMAND... (as ssh)", file=sys.stderr)
        return 2
    where, command = args[0], " ".join(args[1:])
    try:
        k, i = locate(where)
    except ValueError as e:
        print(f"emulated_hosts.py: {e}", file=sys.stderr)
        return 2
    ns = namespace(k, i)
    # The namespaces share one kernel, so MPI's transports would find shared memory and
    # CMA "between hosts": allow only TCP (UCX, libfabric) between them, as between
    # machines. Inside a host MPICH still uses its own shared memory. The launched
    # processes inherit this unless mpiexec passes other values.
    network_only = "export UCX_TLS=tcp,self FI_PROVIDER=tcp"
    script = (
        f"hostname {shlex.quote(f'ddl-host{i}')} && {network_only} && "
        f"cd {shlex.quote(os.getcwd())} && exec {command}"
    )
    os.execvp("ip", ["ip", "netns", "exec", ns, "unshare", "--uts", "sh", "-c", script])
    return 1  # not reached


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["-x"]:
        return launch(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up", help="create N emulated hosts (a new instance)")
    u.add_argument("n", type=int)
    u.add_argument("--rate", help='limit what each host sends, e.g. "1gbit" (tc units)')
    u.add_argument("--delay", help='add latency to what each host sends, e.g. "0.2ms"')
    d = sub.add_parser("down", help="remove an instance (or, without addresses, all)")
    d.add_argument("addresses", nargs="?", help="the addresses `up` printed, comma-separated")
    args = p.parse_args(argv)
    if args.cmd == "up":
        print(",".join(up(args.n, args.rate, args.delay)))
    else:
        down(args.addresses.split(",") if args.addresses else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
