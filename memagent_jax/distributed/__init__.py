"""Multi-process (multi-host) start-up, shared by every entry point.

One JAX process per host (or per GPU group), all running the same program (SPMD). Call `initialize` (or
`initialize_from_flags` in an absl program, `initialize_from_args` in an argparse one) at the top of `main()`,
before any JAX computation:

    from memagent_jax import distributed
    distributed.initialize_from_flags()          # absl: --coordinator_address / --num_processes / --process_id

What it does, in order of precedence:

1. Explicit arguments (or the flags): `coordinator_address` ("host:port" of process 0), `num_processes`,
   `process_id`, optionally `local_device_ids`.
2. Our environment variables, set by `launch/local.py` and usable from any launcher:
   MEMAGENT_COORDINATOR, MEMAGENT_NUM_PROCESSES, MEMAGENT_PROCESS_ID (and MEMAGENT_LOCAL_DEVICE_IDS, comma
   separated).
3. A cluster JAX detects by itself: SLURM with more than one task, Open MPI with more than one rank, a
   multi-worker Cloud TPU (TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES with several hosts, or Megascale), or
   JAX_COORDINATOR_ADDRESS; or MEMAGENT_DISTRIBUTED=1 to force `jax.distributed.initialize()` with JAX's
   own detection (e.g. GCE TPU pods, where the topology comes from the metadata server).
4. Otherwise nothing: a plain single-process run (any number of local devices) needs no set-up.

For CPU processes, cross-process collectives use gloo (`jax_cpu_collectives_implementation`). Calling it again
is a no-op, so entry points that call each other may all call it.

Simulated CPU devices (`jax_num_cpu_devices` / JAX_NUM_CPU_DEVICES > 1): `initialize` first sizes XLA:CPU's thread
pool for their collectives (`size_cpu_thread_pool`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from memagent_jax.errors import UserError

__all__ = [
    "initialize",
    "initialize_from_flags",
    "initialize_from_args",
    "define_flags",
    "add_arguments",
    "cluster_detected",
    "is_initialized",
    "DistributedError",
    "ENV_COORDINATOR",
    "ENV_NUM_PROCESSES",
    "ENV_PROCESS_ID",
    "ENV_LOCAL_DEVICE_IDS",
    "ENV_FORCE",
    "ENV_CPU_THREADS",
    "cpu_pool_threads",
    "size_cpu_thread_pool",
]

log = logging.getLogger(__name__)

ENV_COORDINATOR = "MEMAGENT_COORDINATOR"
ENV_NUM_PROCESSES = "MEMAGENT_NUM_PROCESSES"
ENV_PROCESS_ID = "MEMAGENT_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "MEMAGENT_LOCAL_DEVICE_IDS"
ENV_FORCE = "MEMAGENT_DISTRIBUTED"
ENV_CPU_THREADS = "PJRT_NPROC"  # read by XLA:CPU when its client starts: the size of its intra-op thread pool

# XLA:CPU threads per simulated device: each device can be waiting in two collectives at once (observed), plus the
# thread running its program, with room to spare.
CPU_THREADS_PER_DEVICE = 4

_STATE = {"initialized": False, "multi_process": False}


class DistributedError(UserError):
    """The multi-process settings are inconsistent; the message names the flag or variable at fault."""


def _int_env(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer") from None


def _count_hosts(value: str | None) -> int:
    return len([h for h in (value or "").split(",") if h.strip()])


def cluster_detected() -> str | None:
    """The name of a multi-process cluster environment JAX can configure itself from, or None."""
    env = os.environ
    if env.get(ENV_FORCE, "").strip().lower() in ("1", "true", "yes", "auto"):
        return ENV_FORCE
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(k in env for k in slurm) and _int_env("SLURM_NTASKS") and _int_env("SLURM_NTASKS") > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and (_int_env("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "ompi"
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
    if _count_hosts(hosts) > 1:
        return "tpu"
    return None


def is_initialized() -> bool:
    """Whether this process joined a multi-process run (through `initialize` or `jax.distributed` directly)."""
    import jax

    return _STATE["multi_process"] or jax.distributed.is_initialized()


def cpu_pool_threads(num_devices: int) -> int:
    """The XLA:CPU thread pool size `size_cpu_thread_pool` asks for with `num_devices` simulated devices."""
    return CPU_THREADS_PER_DEVICE * num_devices


def size_cpu_thread_pool(num_devices: int | None = None) -> int | None:
    """Sizes XLA:CPU's thread pool for collectives between simulated CPU devices; returns the size asked for.

    XLA:CPU runs a collective (all-reduce, all-gather, ...) as a blocking wait on a thread of its intra-op pool
    (8 threads for 8 devices on 2 cores, by default). Independent collectives of one program run concurrently, so
    each device can hold a thread waiting in one while another waits in the next: on 2 cores with 8 devices, a step's
    collectives took every thread, the devices still to arrive never got one, and after 40 s XLA aborted the
    process ("Termination timeout for `all reduce ...` ... Exiting to ensure a consistent program state").
    With `num_devices` > 1 (default: `jax_num_cpu_devices`) this sets PJRT_NPROC to `cpu_pool_threads` unless it
    is set already (returns None then, or with one device). It must run before the CPU backend starts.
    """
    import jax

    if num_devices is None:
        num_devices = int(jax.config.jax_num_cpu_devices)
    if num_devices <= 1 or os.environ.get(ENV_CPU_THREADS, "").strip():
        return None
    threads = cpu_pool_threads(num_devices)
    os.environ[ENV_CPU_THREADS] = str(threads)
    return threads


def _use_gloo() -> None:
    """Selects gloo for CPU cross-process collectives (must happen before the CPU backend starts)."""
    import jax

    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception as e:  # an older/newer JAX without the option, or a backend already started
        log.debug("could not select gloo CPU collectives: %s", e)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
) -> bool:
    """Joins a multi-process run when one is configured (see the module docstring); returns whether it did.

    Idempotent: a second call (or a call after `jax.distributed.initialize`) does nothing. A single-process
    run (no arguments, no variables, no cluster; or num_processes=1) does nothing and returns False.
    """
    import jax

    if _STATE["initialized"] or jax.distributed.is_initialized():
        _STATE["initialized"] = True
        return is_initialized()
    size_cpu_thread_pool()
    if coordinator_address is None:
        coordinator_address = os.environ.get(ENV_COORDINATOR) or None
    if num_processes is None:
        num_processes = _int_env(ENV_NUM_PROCESSES)
    if process_id is None:
        process_id = _int_env(ENV_PROCESS_ID)
    if local_device_ids is None and os.environ.get(ENV_LOCAL_DEVICE_IDS, "").strip():
        try:
            local_device_ids = [int(x) for x in os.environ[ENV_LOCAL_DEVICE_IDS].split(",") if x.strip()]
        except ValueError:
            raise DistributedError(
                f"{ENV_LOCAL_DEVICE_IDS}={os.environ[ENV_LOCAL_DEVICE_IDS]!r} is not a comma-separated list of integers"
            ) from None
    explicit = [coordinator_address, num_processes, process_id]
    if num_processes is not None and num_processes < 1:
        raise DistributedError(f"--num_processes must be >= 1, got {num_processes}")
    if num_processes == 1:
        _STATE["initialized"] = True  # one process: nothing to join
        return False
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise DistributedError(f"--process_id must be in [0, {num_processes}), got {process_id}")
    cluster = cluster_detected()
    if all(v is None for v in explicit) and cluster is None:
        _STATE["initialized"] = True
        return False
    if cluster is None and any(v is None for v in explicit):
        missing = [
            name for name, v in zip(("--coordinator_address", "--num_processes", "--process_id"), explicit) if v is None
        ]
        raise DistributedError(
            f"a multi-process run needs {', '.join(missing)} as well (or the environment "
            f"variables {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID})"
        )
    _use_gloo()
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    if local_device_ids is not None:
        kwargs["local_device_ids"] = list(local_device_ids)
    jax.distributed.initialize(**kwargs)
    _STATE["initialized"] = True
    _STATE["multi_process"] = True
    log.info(
        "joined a run of %d processes as process %d (%d local / %d global devices)",
        jax.process_count(),
        jax.process_index(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True


# ------------------------------------------------------------------------------------ command lines

_FLAGS_DEFINED: dict = {}


def define_flags(flag_values=None) -> None:
    """Registers --coordinator_address, --num_processes, --process_id with absl (once per FlagValues)."""
    from absl import flags

    fv = flag_values if flag_values is not None else flags.FLAGS
    if id(fv) in _FLAGS_DEFINED or "coordinator_address" in fv:
        _FLAGS_DEFINED[id(fv)] = fv
        return
    flags.DEFINE_string(
        "coordinator_address",
        None,
        f"multi-process runs: host:port of process 0 (or ${ENV_COORDINATOR})",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "num_processes", None, f"multi-process runs: number of processes (or ${ENV_NUM_PROCESSES})", flag_values=fv
    )
    flags.DEFINE_integer(
        "process_id", None, f"multi-process runs: this process's index (or ${ENV_PROCESS_ID})", flag_values=fv
    )
    _FLAGS_DEFINED[id(fv)] = fv


def initialize_from_flags(flag_values=None) -> bool:
    """`initialize` with the absl flags of `define_flags` (defining them first if nobody did)."""
    from absl import flags

    fv = flag_values if flag_values is not None else flags.FLAGS
    define_flags(fv)
    return initialize(fv["coordinator_address"].value, fv["num_processes"].value, fv["process_id"].value)


def add_arguments(parser) -> None:
    """Adds --coordinator_address / --num_processes / --process_id to an argparse parser."""
    group = parser.add_argument_group("multi-process runs (or the MEMAGENT_* environment variables)")
    group.add_argument(
        "--coordinator_address",
        "--coordinator-address",
        dest="coordinator_address",
        default=None,
        help="host:port of process 0",
    )
    group.add_argument(
        "--num_processes", "--num-processes", dest="num_processes", type=int, default=None, help="number of processes"
    )
    group.add_argument(
        "--process_id", "--process-id", dest="process_id", type=int, default=None, help="this process's index"
    )


def initialize_from_args(args) -> bool:
    """`initialize` with the argparse values of `add_arguments`."""
    return initialize(
        getattr(args, "coordinator_address", None),
        getattr(args, "num_processes", None),
        getattr(args, "process_id", None),
    )
