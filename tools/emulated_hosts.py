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
    python tools/emulated_hosts.py down

Host i is the namespace ddl-host<i> with address <subnet>.<i + 1>; the machine itself is
<subnet>.254 on the bridge (mpiexec's control connections reach it there). mpiexec calls
this script as its "ssh" (`-x ADDRESS COMMAND...`); it runs COMMAND in that host's
namespace with the host name set, the way ssh would on a remote machine. The file system
is shared, so the same paths work on every host, as on a cluster with shared storage.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import socket
import subprocess
import sys

PREFIX = "ddl-host"
BRIDGE = "ddl-hosts-br"
SUBNET = os.environ.get("JAX_DDL_EMULATED_SUBNET", "10.213.77")
NETNS_ETC = pathlib.Path("/etc/netns")


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def address(i: int) -> str:
    return f"{SUBNET}.{i + 1}"


def hosts(n: int) -> list[str]:
    """The addresses to give mpiexec's -hosts."""
    return [address(i) for i in range(n)]


def down() -> None:
    """Removes every emulated host and the bridge (ignores what is not there)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in listed.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(PREFIX):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            etc = NETNS_ETC / name
            if etc.exists():
                for f in etc.iterdir():
                    f.unlink()
                etc.rmdir()
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)


def up(n: int, rate: str | None = None, delay: str | None = None) -> list[str]:
    """Creates `n` hosts on a bridge; `rate` (tc units, e.g. "1gbit") limits what each host
    sends, `delay` (e.g. "0.2ms") adds latency. Returns the hosts' addresses."""
    if n < 1 or n > 250:
        raise ValueError(f"between 1 and 250 hosts; got {n}")
    down()
    sh("ip", "link", "add", BRIDGE, "type", "bridge")
    sh("ip", "addr", "add", f"{SUBNET}.254/24", "dev", BRIDGE)
    sh("ip", "link", "set", BRIDGE, "up")
    names = "\n".join(f"{address(i)} {PREFIX}{i}" for i in range(n))
    hosts_file = f"127.0.0.1 localhost\n{names}\n{SUBNET}.254 {socket.gethostname()}\n"
    for i in range(n):
        ns, outside = f"{PREFIX}{i}", f"{PREFIX}{i}-br"
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "link", "set", outside, "master", BRIDGE, "up")
        sh("ip", "-n", ns, "addr", "add", f"{address(i)}/24", "dev", "eth0")
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
    return hosts(n)


def launch(argv: list[str]) -> int:
    """mpiexec's ssh: `-x ADDRESS COMMAND...`; runs COMMAND in that host's namespace."""
    args = list(argv)
    while args and args[0].startswith("-"):
        args.pop(0)
    if len(args) < 2:
        print("emulated_hosts.py: expected ADDRESS COMMAND... (as ssh)", file=sys.stderr)
        return 2
    where, command = args[0], " ".join(args[1:])
    index = {address(i): i for i in range(250)}.get(where)
    if index is None:
        print(f"emulated_hosts.py: {where!r} is not an emulated host address", file=sys.stderr)
        return 2
    ns = f"{PREFIX}{index}"
    # The namespaces share one kernel, so MPI's transports would find shared memory and
    # CMA "between hosts": allow only TCP (UCX, libfabric) between them, as between
    # machines. Inside a host MPICH still uses its own shared memory. The launched
    # processes inherit this unless mpiexec passes other values.
    network_only = "export UCX_TLS=tcp,self FI_PROVIDER=tcp"
    script = f"hostname {ns} && {network_only} && cd {os.getcwd()!r} && exec {command}"
    os.execvp("ip", ["ip", "netns", "exec", ns, "unshare", "--uts", "sh", "-c", script])
    return 1  # not reached


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["-x"]:
        return launch(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up", help="create N emulated hosts")
    u.add_argument("n", type=int)
    u.add_argument("--rate", help='limit what each host sends, e.g. "1gbit" (tc units)')
    u.add_argument("--delay", help='add latency to what each host sends, e.g. "0.2ms"')
    sub.add_parser("down", help="remove them")
    args = p.parse_args(argv)
    if args.cmd == "up":
        print(",".join(up(args.n, args.rate, args.delay)))
    else:
        down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
