"""Multi-process runs under mpiexec (MPICH from the `mpi` extra): the start-up through
jax_ddl.distributed, collectives across and inside processes, and the training program
with 2 processes x 4 devices against 1 process x 8 devices."""

import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jax_ddl._src import model

ROOT = pathlib.Path(__file__).resolve().parents[1]


def mpiexec() -> str:
    """MPICH's mpiexec from this environment (the `mpi` extra installs it beside python)."""
    here = pathlib.Path(sys.executable).parent / "mpiexec"
    found = str(here) if here.exists() else shutil.which("mpiexec")
    assert found, "mpiexec not found: install the mpi extra (pip install '.[mpi]')"
    return found


def run_mpi(n, *args, timeout=300, env=None, launcher=(), shell=False, cwd=ROOT):
    """mpiexec -n N python ARGS. shell=True runs each process under `sh`, so the signals
    hydra sends the survivors when a process dies (SIGUSR1, and sometimes SIGKILL even
    with -disable-auto-cleanup) reach the shell, not the process under test."""
    base = {k: v for k, v in os.environ.items() if k not in ("JAX_ENABLE_X64", "XLA_FLAGS")}
    wrap = ["sh", "-c", '"$@"', "sh"] if shell else []
    return subprocess.run(
        [mpiexec(), *launcher, "-n", str(n), *wrap, sys.executable, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**base, **(env or {})},
        cwd=cwd,
    )


@pytest.mark.parametrize(
    "procs, local, topologies",
    [
        (2, 4, ["4x2", "2x2x2", "8", "2x4"]),
        (4, 2, ["2x4", "2x2x2", "8", "4x2"]),
        # 3 processes: with "3x2" the processes a device exchanges with differ by device.
        (3, 2, ["2x3", "6", "3x2"]),
        # One device per process: every grid runs the hierarchy across processes, whose
        # local stage is a copy and whose chunks then start at once.
        (4, 1, ["2x2", "4"]),
    ],
)
def test_collectives_across_and_inside_processes(procs, local, topologies):
    program = ROOT / "tests" / "mpi_programs" / "collectives.py"
    r = run_mpi(procs, program, local, *topologies)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # Processes' output lines may interleave: count the markers, not lines.
    assert sorted(int(i) for i in re.findall(r"OK (\d+)", r.stdout)) == list(range(procs))


def _emulated_hosts_module():
    spec = importlib.util.spec_from_file_location(
        "emulated_hosts", ROOT / "tools" / "emulated_hosts.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def two_hosts():
    """Two emulated hosts (network namespaces with their own host names, MPI between them
    over TCP); mpiexec launches into them through tools/emulated_hosts.py. Up for the
    test that uses them only, so no other test runs beside a bridge it did not ask for."""
    hosts = _emulated_hosts_module()
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("emulated hosts need root and iproute2 (network namespaces)")
    try:
        addresses = hosts.up(2)
    except (subprocess.CalledProcessError, OSError) as e:
        pytest.skip(f"cannot create network namespaces here: {getattr(e, 'stderr', '') or e}")
    launcher = ("-launcher", "ssh", "-launcher-exec", str(ROOT / "tools" / "emulated_hosts.py"))
    yield (*launcher, "-hosts", ",".join(addresses))
    hosts.down(addresses)


def test_emulated_host_instances_are_independent_and_paths_are_quoted(tmp_path):
    """Two sets of emulated hosts at once get different namespaces and subnets, and taking
    one down leaves the other; the launcher runs commands in a directory whose name needs
    shell quoting."""
    hosts = _emulated_hosts_module()
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("emulated hosts need root and iproute2 (network namespaces)")
    a, b = hosts.up(1), hosts.up(2)
    try:
        assert a[0].rsplit(".", 1)[0] != b[0].rsplit(".", 1)[0]
        names = lambda: {n for n, _ in hosts._namespaces()}  # noqa: E731
        ka, kb = hosts.locate(a[0])[0], hosts.locate(b[0])[0]
        assert {f"ddl{ka}-host0", f"ddl{kb}-host0", f"ddl{kb}-host1"} <= names()
        odd = tmp_path / "it's a $dir"
        odd.mkdir()
        r = subprocess.run(
            [sys.executable, ROOT / "tools" / "emulated_hosts.py", "-x", b[1], "pwd"],
            capture_output=True,
            text=True,
            cwd=odd,
        )
        assert r.returncode == 0 and r.stdout.strip() == str(odd), r.stderr
        hosts.down(a)
        assert f"ddl{ka}-host0" not in names()
        assert {f"ddl{kb}-host0", f"ddl{kb}-host1"} <= names()
    finally:
        hosts.down(a)
        hosts.down(b)


def test_collectives_across_two_emulated_hosts(two_hosts):
    """2 hosts x 2 processes x 2 devices: hosts counted, the default topology 2x2x2 (local,
    processes per host, hosts), the flat spec and grids spanning processes, all exact."""
    program = ROOT / "tests" / "mpi_programs" / "collectives.py"
    r = run_mpi(
        4,
        program,
        2,
        "8",
        "2x4",
        "4x2",
        launcher=(*two_hosts, "-ppn", "2"),
        env={"EXPECT_HOSTS": "2"},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(int(i) for i in re.findall(r"OK (\d+)", r.stdout)) == list(range(4))


def test_launched_by_mpiexec_is_false_in_a_plain_process(monkeypatch):
    import jax_ddl.distributed

    for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"):
        monkeypatch.delenv(name, raising=False)
    assert not jax_ddl.distributed.launched_by_mpiexec()
    monkeypatch.setenv("PMI_SIZE", "2")
    assert jax_ddl.distributed.launched_by_mpiexec()
    assert jax_ddl.distributed.layout() is None


def test_an_mpi_other_than_the_launchers_is_an_error_not_lone_processes(tmp_path):
    """A launcher that announces 2 processes to an MPI that sees 1 (mpi4py loaded another
    MPI than the launcher's: seen on a machine with a system Open MPI) must not leave every
    process running alone."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_ENABLE_X64", "XLA_FLAGS")}
    r = subprocess.run(
        [sys.executable, "-c", "import jax_ddl.distributed as d; d.initialize(local_devices=2)"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "PMI_SIZE": "2"},
        cwd=tmp_path,  # not the source tree, whose jax_ddl is not built
    )
    assert r.returncode != 0
    assert "the launcher started 2 processes (PMI_SIZE=2) but MPI sees 1" in r.stderr, r.stderr
    assert "MPI4PY_LIBMPI" in r.stderr


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _losses(path):
    records = _records(path)
    return [r["loss"] for r in records if r["kind"] == "train"], [
        r["accuracy"] for r in records if r["kind"] == "eval"
    ]


TRAIN = ROOT / "examples" / "train.py"


def _train_args(allreduce, *extra):
    return [
        "--model",
        "resnet18",
        "--width",
        "4",
        "--steps",
        "4",
        "--eval-every",
        "2",
        "--no-progress",
        "--allreduce",
        allreduce,
        *extra,
    ]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The training program in one process with 8 devices, per --allreduce (run once)."""
    runs = {}

    def run(allreduce):
        if allreduce not in runs:
            out = tmp_path_factory.mktemp(f"single-{allreduce}")
            r = subprocess.run(
                [sys.executable, str(TRAIN), *_train_args(allreduce), "--out-dir", str(out)],
                capture_output=True,
                text=True,
                timeout=300,
                cwd=ROOT,
                env={
                    k: v for k, v in os.environ.items() if k not in ("JAX_ENABLE_X64", "XLA_FLAGS")
                },
            )
            assert r.returncode == 0, r.stderr[-3000:]
            runs[allreduce] = _losses(out / "metrics.jsonl")
        return runs[allreduce]

    return run


def _train_mpi(n, out_dir, allreduce, *extra, launcher=()):
    local = str(8 // n)
    r = run_mpi(
        n,
        TRAIN,
        *_train_args(allreduce, *extra),
        "--host-devices",
        local,
        "--out-dir",
        out_dir,
        launcher=launcher,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"8 cpu devices in {n} process(es)" in r.stderr
    # Only the first process writes; the others stay silent.
    assert r.stdout.count("done: steps 0->4") == 1
    if allreduce == "ddl":
        assert "in jax_ddl:" in r.stdout
    return _losses(out_dir / "metrics.jsonl")


@pytest.mark.parametrize("allreduce", ["ddl", "lax"])
def test_training_two_processes_matches_one(tmp_path, allreduce, one_process):
    """Also --measure-exposed across processes: every process runs its rounds (the train
    step's collectives need both), the first reports, and the trained results are those
    of the run without it (the one-process run does not measure)."""
    mp_loss, mp_acc = _train_mpi(2, tmp_path / "mp", allreduce, "--measure-exposed", "2")
    (summary,) = [x for x in _records(tmp_path / "mp" / "metrics.jsonl") if x["kind"] == "summary"]
    assert summary["exposed_steps"] == 2 and summary["exposed_baseline_s"] > 0
    sp_loss, sp_acc = one_process(allreduce)
    # Same global batches, rows split by process. Across processes the 8 gradients are
    # added in another order (jax_ddl: 4 in shared memory, then across the 2 processes;
    # gloo: its own), so float32 rounding differs: measured 2e-7 relative after 4 steps.
    np.testing.assert_allclose(mp_loss, sp_loss, rtol=1e-5)
    assert len(mp_loss) == 4 and mp_acc == pytest.approx(sp_acc, abs=1 / 360)


def test_training_with_the_flat_spec_across_processes_matches_one(tmp_path, one_process):
    """The flat spec across 2 processes (every stage exchanges with remote devices) in the
    main job. Its reduction gives one process's bits (tests/mpi_programs/collectives.py
    checks that bitwise); the per-device forward and backward passes of 2 processes x 4
    devices round differently from 1 x 8 now and then: measured equal losses for 3 steps,
    then 2e-7 relative at step 4."""
    mp_loss, mp_acc = _train_mpi(2, tmp_path / "mp", "ddl", "--topology", "8")
    sp_loss, sp_acc = one_process("ddl")
    np.testing.assert_allclose(mp_loss, sp_loss, rtol=1e-5)
    assert mp_acc == pytest.approx(sp_acc, abs=1 / 360)


def test_training_across_two_emulated_hosts(tmp_path, two_hosts, one_process):
    """The main job across hosts: 2 emulated hosts x 1 process x 4 devices (MPI over TCP)."""
    launcher = (*two_hosts, "-ppn", "1")
    mp_loss, mp_acc = _train_mpi(2, tmp_path / "mh", "ddl", launcher=launcher)
    sp_loss, sp_acc = one_process("ddl")
    np.testing.assert_allclose(mp_loss, sp_loss, rtol=1e-5)
    assert mp_acc == pytest.approx(sp_acc, abs=1 / 360)


def test_calibrate_across_two_processes_measures_the_host_link(tmp_path):
    """python -m jax_ddl.calibrate under mpiexec (2 processes of 2 devices on this host):
    the link between the processes is measured (latency, a bandwidth per message size,
    polled as the engine polls), with the overlap of memory work and messages, and the
    profile is one the model loads and predicts the launch's grids from."""
    out = tmp_path / "profile.json"
    r = run_mpi(
        2,
        "-m",
        "jax_ddl.calibrate",
        "--devices",
        "2",
        "--out",
        out,
        "--fault-sizes",
        "1M",
        "--message-sizes",
        "64K,256K",
        "-n",
        "3",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("written to") == 1  # the first process reports
    prof = model.Profile.load(str(out))
    assert prof.placement == model.Placement(1, 2, 2)
    host = prof.links["host"]
    assert 0 < host.latency_s < 0.1 and host.bandwidth_Bps > 1e7
    assert [m for m, _ in host.curve] == [64 << 10, 256 << 10]
    assert all(bw > 1e7 for _, bw in host.curve)
    assert 0 <= prof.overlap <= 1
    for dims in ((2, 2), (4,)):
        t = model.predict(16 << 20, dims, prof.placement, prof)["time_s"]
        assert 1e-4 < t < 10


def test_calibrate_measures_both_patterns_between_hosts(tmp_path):
    """The calibration's exchanges between hosts, run by 2 processes of 2 device slots told
    they are 2 hosts: the ring pattern (one message per slot) and the flat plan's (every
    slot to every slot of the other host's process) each complete (sends and receives
    match: a mismatch would hang) and give a curve per message size and their stream
    counts (2 and 4 messages per process in flight)."""
    script = tmp_path / "links.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, sys
            from mpi4py import MPI
            from jax_ddl._src import calibrate, model

            class World:
                comm = MPI.COMM_WORLD
                rank = comm.rank
                def barrier(self):
                    self.comm.Barrier()
                def gather(self, v):
                    return self.comm.allgather(v)

            out = calibrate.link_terms(World(), model.Placement(2, 1, 2), [1024, 65536], 2, 2)
            if MPI.COMM_WORLD.rank == 0:
                print("LINKS " + json.dumps(out))
            """
        )
    )
    r = run_mpi(2, script, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    (line,) = [x for x in r.stdout.splitlines() if x.startswith("LINKS ")]
    links = json.loads(line[len("LINKS ") :])
    assert set(links) == {"network", "network_fan"}  # no overlap asked for (no copy rate)
    for name, streams in (("network", 2), ("network_fan", 4)):
        latency, bandwidth, curve, count = links[name]
        assert count == streams
        assert [m for m, _ in curve] == [1024, 65536] and all(bw > 1e5 for _, bw in curve)
        assert bandwidth == curve[-1][1] and latency > 0


@pytest.mark.parametrize(
    "mode, topology",
    [("skip", None), ("kill", None), ("shape", None), ("kill", "4"), ("shape", "4")],
)
def test_a_missing_or_different_process_fails_the_others_within_the_deadline(mode, topology):
    """Process 1 never calls (skip), dies by SIGKILL (kill) or reduces another shape
    (shape): process 0 fails with a message naming it, within JAX_DDL_TIMEOUT. With the
    default topology (DDL's hierarchy) and the flat one (groups spanning processes)."""
    timeout_s = 5
    r = run_mpi(
        2,
        ROOT / "tests" / "mpi_programs" / "failures.py",
        mode,
        2,
        *([topology] if topology else []),
        env={"JAX_DDL_TIMEOUT": str(timeout_s)},
        # Keep the survivors running when a process dies, so they can report.
        launcher=("-disable-auto-cleanup",),
        timeout=120,
        shell=True,
    )
    failed = {
        int(m[0]): (float(m[1]), m[2]) for m in re.findall(r"FAILED (\d) ([\d.]+) (.*)", r.stdout)
    }
    assert 0 in failed, r.stdout[-3000:] + r.stderr[-3000:]
    seconds, message = failed[0]
    assert f"topology {topology or '2x2'}," in message
    if mode == "shape":
        assert "processes disagree on the call" in message
        assert "(4096 elements of float32, sum), process 1 has call" in message
        assert "(4000 elements of float32, sum)" in message
        assert 1 in failed and seconds < timeout_s  # both fail, at once
    else:
        assert "DEADLINE_EXCEEDED" in message
        assert "processes [1] (ranks 2-3) never arrived" in message
        assert timeout_s - 0.5 <= seconds <= timeout_s + 5


def _recovery(mode, env=None, output=None):
    """Runs tests/mpi_programs/recovery.py in `mode` with 2 processes x 2 devices; returns
    {(rank, label): (verdict, seconds, message)} (and appends the output to `output`)."""
    r = run_mpi(
        2,
        ROOT / "tests" / "mpi_programs" / "recovery.py",
        mode,
        2,
        env={"JAX_DDL_TIMEOUT": "3", **(env or {})},
        launcher=("-disable-auto-cleanup",),
        timeout=240,
        shell=True,
    )
    calls = {
        (int(m[0]), m[1]): (m[2], float(m[3]), m[4])
        # Lines of the two processes may run into each other: a message ends where the
        # next marker starts.
        for m in re.findall(
            r"CALL (\d) (\S+) (ok|wrong|error) ([\d.]+) ?(.*?)(?=CALL \d|DONE \d|$)",
            r.stdout,
            flags=re.M,
        )
    }
    assert sorted(re.findall(r"DONE (\d)", r.stdout)) == ["0", "1"], (
        r.stdout[-3000:] + r.stderr[-3000:]
    )
    if output is not None:
        output.append(r.stdout)
    return calls


def test_call_identity_does_not_depend_on_what_a_process_lowered_before():
    """Process 0 lowers, prints and compiles other jax_ddl functions first; then both run
    one program of 4 independent same-shape calls, a jitted function called twice and a
    jax.lax.psum, 5 times, hierarchically and with the flat spec: every result exact, and
    the program's lowered text the same in both processes. Also: the process survives the
    launcher's SIGUSR1, its child processes start with the default action."""
    output = []
    calls = _recovery("identity", output=output)
    assert len(calls) == 2 * (2 * 5 + 1)
    assert {v[0] for v in calls.values()} == {"ok"}, calls
    hashes = re.findall(r"HLO (\d) (\S+) ([0-9a-f]+)", output[0])
    assert len(hashes) == 4
    for topo in ("default", "4"):
        assert len({h for _, t, h in hashes if t == topo}) == 1, hashes


def test_a_program_that_starts_jax_distributed_itself_gets_the_transport():
    """jax.distributed.initialize(..., process_id=MPI rank) by the program, no
    jax_ddl.distributed: the first call across processes attaches MPI, and it is exact."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    calls = _recovery("user-init", env={"COORDINATOR_PORT": str(port)})
    assert len(calls) == 6 and {v[0] for v in calls.values()} == {"ok"}, calls


def test_a_process_late_past_the_deadline_never_gets_wrong_sums():
    """Process 1 arrives 5 s late (deadline 3 s) at the first of four calls of one jitted
    psum, inputs scaled by 1..4. Every call either returns exact sums or fails clearly:
    late frames of abandoned calls are recognised and dropped, never taken for the next
    call's. The processes fall back in step within the four calls. Each call is cut into 8
    pipeline chunks, so a failure leaves several chunks' messages in flight."""
    calls = _recovery("late", env={"LATE_S": "5", "JAX_DDL_CHUNK_BYTES": "100000"})
    assert len(calls) == 8
    assert "wrong" not in {v[0] for v in calls.values()}, calls
    assert calls[(0, "call1")][0] == "error" and "never arrived" in calls[(0, "call1")][2]
    for rank in (0, 1):
        assert calls[(rank, "call4")][0] == "ok", calls


def test_a_device_late_past_the_deadline_is_named_by_the_other_process():
    """One device of process 1 (rank 3) stalls 5 s (deadline 3 s) before its handshake,
    the other is on time and passes its own. Process 0's device whose peer was on time
    waits for its local peer that waits on process 1: the error both report names process
    1 and its ranks, not the local peer. No call gives wrong sums; the processes fall back
    in step within four calls."""
    calls = _recovery("slot", env={"LATE_S": "5"})
    assert len(calls) == 8
    assert "wrong" not in {v[0] for v in calls.values()}, calls
    verdict, seconds, message = calls[(0, "call1")]
    assert verdict == "error", calls
    assert "processes [1] (ranks 2-3) never arrived at the cross-process handshake" in message
    assert "did not reach stage" not in message, message
    assert 3 - 0.5 <= seconds <= 3 + 5
    for rank in (0, 1):
        assert calls[(rank, "call4")][0] == "ok", calls


def test_processes_with_different_topologies_fail_at_once_naming_both():
    calls = _recovery("topology")
    for rank, (mine, theirs) in ((0, ("2x2", "4")), (1, ("4", "2x2"))):
        verdict, seconds, message = calls[(rank, "mismatch")]
        assert verdict == "error" and seconds < 3, calls
        assert "processes disagree on the topology" in message
        assert f"this process uses {mine} (" in message and f"uses {theirs} (" in message
        assert calls[(rank, "agreed")][0] == "ok"


def test_processes_that_chunk_a_call_differently_fail_at_once_naming_both():
    calls = _recovery("chunking")
    for rank, (mine, theirs) in ((0, (9, 5)), (1, (5, 9))):
        verdict, seconds, message = calls[(rank, "mismatch")]
        assert verdict == "error" and seconds < 3, calls
        assert f"this process cuts it into {mine} chunks, process {1 - rank} into {theirs}" in (
            message
        )
        assert "JAX_DDL_CHUNK_BYTES" in message
        assert calls[(rank, "agreed")][0] == "ok"


def test_a_short_message_is_an_error_never_stale_bytes():
    """Process 1 sends every data frame one byte short: process 0 names the sizes (its
    MPI_Get_count check), process 1 fails by the deadline; the next call is exact. In 8
    pipeline chunks: the failure abandons the messages of the chunks still in flight."""
    calls = _recovery("short", env={"JAX_DDL_CHUNK_BYTES": "100000"})
    verdict, _, message = calls[(0, "short")]
    assert verdict == "error" and re.search(
        r"sent a frame of (\d+) bytes where (\d+) were", message
    )
    # Process 1 passed this call's handshake with process 0 (and may have taken some of its
    # frames, depending on how far process 0 got), then process 0 gave up: process 1 names
    # process 0 as one that stopped sending, not as one that never came.
    verdict, _, message = calls[(1, "short")]
    assert verdict == "error", calls
    assert "processes [0] (ranks 0-1) stopped sending during the cross-process exchange" in (
        message
    ), message
    assert "this call's handshake with them passed" in message, message
    assert calls[(0, "after")][0] == "ok" and calls[(1, "after")][0] == "ok"


def test_benchmark_under_mpiexec_puts_jax_ddl_beside_flat_gloo_and_raw_mpi(tmp_path):
    out = tmp_path / "bench.json"
    r = run_mpi(
        2,
        "-m",
        "jax_ddl.bench",
        "--devices",
        "2",
        "-b",
        "1K",
        "-e",
        "8K",
        "-f",
        "8",
        "-n",
        "2",
        "-w",
        "0",
        "--json",
        out,
        cwd=tmp_path,  # not the source tree: -m would import jax_ddl from it
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["settings"]["processes"] == 2 and result["settings"]["devices"] == 4
    rows = result["rows"]
    assert result["settings"]["topology"] == "2x2"
    assert {x["impl"] for x in rows} == {"jax_ddl", "ddl-flat", "lax.psum", "mpi"}
    assert [x["size"] for x in rows if x["impl"] == "mpi"] == [1024, 8192]
    # The JSON is the first process's, as the printed table: the same medians.
    printed = re.findall(r"^ +(\d+) +\d+ +float32 +sum +(\S+) \| oop +([\d.]+)", r.stdout, re.M)
    assert len(printed) == len(rows)
    for (size, impl, oop), x in zip(printed, rows):
        assert (int(size), impl) == (x["size"], x["impl"])
        assert float(oop) == pytest.approx(x["oop"]["time_us"], abs=0.051)
    for x in rows:  # every result checked against the known sum, on every process
        assert x["oop"]["wrong"] == 0 and x["ip"]["wrong"] == 0
    assert all("x_lax" in x["ip"] for x in rows if x["impl"] != "lax.psum")
    assert r.stdout.count("# jax_ddl allreduce benchmark") == 1  # only the first process
