"""Multi-process start-up under mpiexec: MPI first, then jax.distributed from MPI's ranks.

One MPI rank per process. MPI is initialised with MPI_THREAD_MULTIPLE (jax_ddl's threads
talk MPI concurrently, one sub-communicator per local device slot), and rank 0 publishes
the address of jax's coordination service to the others over MPI, so a program needs no
hand-written host:port to start. A program that starts jax.distributed itself (the usual
JAX way) gets the MPI transport attached at its first jax_ddl call across processes.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import jax

# Variables that mpiexec (MPICH's hydra, Open MPI, Slurm's PMI) sets in every process.
_LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")

_layout = None


def _launcher_size() -> tuple[str, int] | None:
    """(variable, processes) as the MPI launcher announced them, if it did."""
    for name in _LAUNCHER_SIZE_VARS:
        raw = os.environ.get(name)
        if raw and raw.isdigit() and int(raw) > 1:
            return name, int(raw)
    return None


def launched_by_mpiexec() -> bool:
    """True when this process was started by an MPI launcher with more than one rank."""
    return _launcher_size() is not None


def _mpi():
    try:
        import mpi4py

        mpi4py.rc.thread_level = "multiple"
        from mpi4py import MPI
    except ImportError as e:
        raise ImportError(
            "jax_ddl.distributed needs mpi4py and an MPI library; install them with "
            "pip install 'jax_ddl[mpi]' (mpi4py and MPICH from PyPI)"
        ) from e
    return MPI


def _world(problem, fix):
    """(MPI, COMM_WORLD) once MPI gives MPI_THREAD_MULTIPLE (else RuntimeError: `problem`,
    the level MPI gave, `fix`), with errors returned: a failing peer must surface as an
    error jax_ddl reports, not abort every process."""
    MPI = _mpi()
    provided = MPI.Query_thread()
    if provided != MPI.THREAD_MULTIPLE:
        raise RuntimeError(f"{problem}; the MPI library gave thread level {provided}. {fix}")
    comm = MPI.COMM_WORLD
    comm.Set_errhandler(MPI.ERRORS_RETURN)
    return MPI, comm


def initialize(
    *,
    local_devices: int | None = None,
    coordinator_port: int | None = None,
    timeout_s: int = 300,
    recoverable: bool = True,
) -> dict:
    """Joins this process to a multi-process JAX program launched with mpiexec.

    Call it first, before anything touches a JAX device. It initialises MPI (thread level
    MULTIPLE), selects XLA's gloo collectives for CPU (so jax.lax collectives work across
    processes too), and calls jax.distributed.initialize with MPI's rank and size; rank 0
    hosts the coordination service on a free port and tells the others over MPI.

    Args:
      local_devices: CPU devices per process (sets jax_num_cpu_devices); None keeps the
        platform's (one per process on CPU unless set elsewhere).
      coordinator_port: the port for jax's coordination service on rank 0; None picks a
        free one.
      timeout_s: how long processes wait for each other to join.
      recoverable: ignore SIGUSR1 (unless the program handles it), which MPICH's mpiexec
        sends the survivors when a process dies and which would otherwise terminate them
        silently; a collective waiting for the dead process then fails with jax_ddl's
        error naming the missing ranks. (Launch with -disable-auto-cleanup, or mpiexec
        kills the survivors itself.)

    Returns:
      dict with `process_index`, `process_count`, `hosts` (number of distinct hosts),
      `processes_per_host`.

    Raises:
      ImportError: mpi4py is missing (install the `mpi` extra).
      RuntimeError: MPI could not give MPI_THREAD_MULTIPLE, sees fewer processes than the
        launcher started (mpi4py loaded another MPI than the launcher's), or processes
        are spread unevenly over hosts.
    """
    global _layout
    MPI, comm = _world(
        "jax_ddl needs MPI_THREAD_MULTIPLE",
        "Import jax_ddl.distributed before mpi4py.MPI, or build MPI with thread support.",
    )
    rank, size = comm.Get_rank(), comm.Get_size()
    announced = _launcher_size()
    if announced and announced[0] in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE") and announced[1] != size:
        library = MPI.Get_library_version().splitlines()[0].strip()
        raise RuntimeError(
            f"the launcher started {announced[1]} processes ({announced[0]}={announced[1]}) "
            f"but MPI sees {size}: mpi4py loaded {library!r}, which is not the MPI of the "
            "launcher, so every process runs alone. Use the mpiexec of the MPI mpi4py loads, "
            "or point mpi4py at the launcher's library (MPI4PY_LIBMPI=/path/to/libmpi.so.12 "
            "for MPICH from the mpi extra, which installs it in the environment's lib/)."
        )
    hosts = comm.allgather(MPI.Get_processor_name())
    distinct = sorted(set(hosts), key=hosts.index)
    per_host = {h: hosts.count(h) for h in distinct}
    if len(set(per_host.values())) != 1:
        raise RuntimeError(
            f"processes are spread unevenly over hosts ({per_host}); launch the same number "
            "of processes on every host"
        )
    if local_devices is not None:
        if local_devices < 1:
            raise ValueError(f"local_devices must be >= 1; got {local_devices}")
        jax.config.update("jax_num_cpu_devices", local_devices)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if recoverable:
        _survive_sigusr1()
    address = None
    if rank == 0:
        host = "127.0.0.1" if len(distinct) == 1 else socket.gethostname()
        port = coordinator_port or _free_port()
        address = f"{host}:{port}"
    address = comm.bcast(address, root=0)
    jax.distributed.initialize(
        address, num_processes=size, process_id=rank, initialization_timeout=timeout_s
    )
    _attach_transport(MPI, comm, rank, size, deadline=time.monotonic() + timeout_s)
    _layout = _host_layout(hosts, rank, size)
    return dict(_layout)


def _host_layout(hosts: list, rank: int, size: int) -> dict:
    distinct = sorted(set(hosts), key=hosts.index)
    even = len({hosts.count(h) for h in distinct}) == 1
    return {
        "process_index": rank,
        "process_count": size,
        "hosts": len(distinct),
        "processes_per_host": size // len(distinct),
        # Each host's processes are consecutive ranks (mpiexec's default block placement):
        # then the default topology can have a host dimension.
        "hosts_contiguous": even
        and all(hosts[r] == hosts[r - r % (size // len(distinct))] for r in range(size)),
    }


def _ignore_sigusr1(signum, frame) -> None:
    """Keeps a surviving process alive when MPICH's launcher signals a failed peer."""


def _survive_sigusr1() -> None:
    """MPICH's launcher signals SIGUSR1 to the survivors when a process fails; its default
    action would kill them silently before jax_ddl can name the missing ranks. Catch it
    with a handler that does nothing, unless the program installed one of its own. A
    handler (not SIG_IGN) is reset to the default in child processes when they start a
    program, so children keep the normal behaviour."""
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread
    if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGUSR1, _ignore_sigusr1)


_slot_comms: list = []
_attach_lock = threading.Lock()


def _wait(request, deadline: float, what: str) -> None:
    """Completes a nonblocking MPI collective, polling, or fails by `deadline`."""
    pause = 1e-4
    while not request.Test():
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"jax_ddl: not every process reached {what} within JAX_DDL_TIMEOUT; every "
                "process must trace the same jax_ddl calls across processes"
            )
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def _attach_transport(MPI, comm, rank: int, size: int, deadline: float) -> None:
    """One communicator per local device slot, each spanning all processes, so all slots
    exchange across processes at once; errors are returned to jax_ddl (which fails the call
    naming the processes) instead of aborting every process. Collective: every process
    attaches, and waits for the others until `deadline`."""
    from jax_ddl import _ddl

    if not _ddl.mpi_compiled_in():
        return  # reductions across processes are then refused at trace time, naming why
    comms = []
    for _ in range(jax.local_device_count()):
        slot, request = comm.Idup()
        _wait(request, deadline, "the attachment of jax_ddl's MPI transport")
        slot.Set_errhandler(MPI.ERRORS_RETURN)
        comms.append(slot)
    _slot_comms[:] = comms
    _ddl.mpi_attach([_signed(MPI._handleof(c)) for c in _slot_comms], rank, size)


def attach_on_first_use(api: str, timeout_s: float) -> None:
    """Attaches the MPI transport in a program that started jax.distributed itself.

    Called when a reduction across processes is traced and the transport is not attached.
    Under mpiexec, with one MPI rank per jax process in the same order, it initialises MPI
    (thread level MULTIPLE) through mpi4py, counts hosts, and attaches; every process
    does the same at its first such call, and waits up to `timeout_s` for the others.

    Raises:
      NotImplementedError: not under mpiexec, or a build without the MPI transport.
      RuntimeError: MPI's ranks are not jax's processes, or the others never attached.
    """
    global _layout
    from jax_ddl import _ddl

    with _attach_lock:
        if _ddl.mpi_attached():
            return
        if not _ddl.mpi_compiled_in():
            raise NotImplementedError(
                f"{api}: the reduction crosses processes, and this build of jax_ddl has no MPI "
                "transport (no MPI headers when it was built); reinstall with the mpi extra"
            )
        if not launched_by_mpiexec():
            raise NotImplementedError(
                f"{api}: the reduction crosses processes, which jax_ddl does over MPI: start "
                "the program under mpiexec (and call jax_ddl.distributed.initialize(), or "
                "jax.distributed.initialize with process_id = the MPI rank)"
            )
        MPI, comm = _world(
            f"{api}: MPI was initialised without MPI_THREAD_MULTIPLE",
            "Import mpi4py with mpi4py.rc.thread_level = 'multiple' (its default) or leave "
            "it to jax_ddl.",
        )
        rank, size = comm.Get_rank(), comm.Get_size()
        if (rank, size) != (jax.process_index(), jax.process_count()):
            raise RuntimeError(
                f"{api}: MPI rank {rank} of {size} runs jax process {jax.process_index()} of "
                f"{jax.process_count()}; jax_ddl pairs processes by MPI rank, so start "
                "jax.distributed with num_processes = the MPI size and process_id = the MPI "
                "rank (or call jax_ddl.distributed.initialize(), which does)"
            )
        deadline = time.monotonic() + timeout_s
        names = bytearray(MPI.Get_processor_name().encode()[:255].ljust(256, b"\0"))
        gathered = bytearray(256 * size)
        request = comm.Iallgather(names, gathered)
        _wait(request, deadline, "the attachment of jax_ddl's MPI transport")
        hosts = [
            bytes(gathered[i * 256 : (i + 1) * 256]).rstrip(b"\0").decode() for i in range(size)
        ]
        _survive_sigusr1()
        _attach_transport(MPI, comm, rank, size, deadline)
        _layout = _host_layout(hosts, rank, size)


def _signed(handle: int) -> int:
    """mpi4py gives MPICH's (int) handles as unsigned 64-bit values; C++ wants them signed."""
    return handle - (1 << 64) if handle >= (1 << 63) else handle


def layout() -> dict | None:
    """What `initialize` found (None in a single-process program)."""
    return None if _layout is None else dict(_layout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
