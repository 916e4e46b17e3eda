#!/usr/bin/env python3
"""Local multi-process launcher: N JAX processes on this machine, joined through a 127.0.0.1 coordinator.

    python launch/local.py --num_processes 2 --devices_per_process 4 -- \\
        python -m memagent_jax.train --config configs/grpo.py:cpu --workdir runs/mp --config.model.path=/tmp/tiny

Every process gets the command unchanged plus, in its environment:

    MEMAGENT_COORDINATOR=127.0.0.1:<port>   MEMAGENT_NUM_PROCESSES=<N>   MEMAGENT_PROCESS_ID=<i>
    platform cpu (default): JAX_PLATFORMS=cpu  JAX_NUM_CPU_DEVICES=<d>    (d simulated CPU devices per process)
    platform gpu:           CUDA_VISIBLE_DEVICES=<i*d .. i*d+d-1>        (d GPUs per process)

which `memagent_jax.distributed.initialize` (called by every entry point) reads; `--pass_flags` also appends
`--coordinator_address/--num_processes/--process_id` to the command. Each output line is printed with a `[p<i>]` prefix
and written to `<log_dir>/process_<i>.log`. If one process fails, the others are stopped and the launcher exits with
that process's status; Ctrl-C (or SIGTERM to the launcher) stops them all. `--dry_run` prints the exact commands and
environment variables and starts nothing.

This is the same SPMD layout as a multi-host run (one process per host): use it to test multi-host code paths on
one machine. It needs nothing but the Python standard library.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

PLATFORMS = ("cpu", "gpu", "none")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(argv):
    if "--" in argv:
        split = argv.index("--")
        own, command = argv[:split], argv[split + 1 :]
    else:
        own, command = argv, []
    p = argparse.ArgumentParser(
        prog="launch/local.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="%(prog)s --num_processes N [options] -- COMMAND ...",
    )
    p.add_argument("--num_processes", type=int, required=True, help="processes to start")
    p.add_argument(
        "--devices_per_process", type=int, default=1, help="CPU: simulated devices per process; GPU: GPUs per process"
    )
    p.add_argument(
        "--platform",
        choices=PLATFORMS,
        default="cpu",
        help="cpu (default): JAX_PLATFORMS=cpu and JAX_NUM_CPU_DEVICES; gpu: CUDA_VISIBLE_DEVICES "
        "ranges; none: leave device settings alone",
    )
    p.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (default: a free one)")
    p.add_argument("--log_dir", default=None, help="per-process log files (default: a new temporary folder)")
    p.add_argument(
        "--pass_flags",
        action="store_true",
        help="also append --coordinator_address/--num_processes/--process_id to the command",
    )
    p.add_argument(
        "--grace_s",
        type=float,
        default=10.0,
        help="seconds to wait after SIGTERM before SIGKILL when stopping processes",
    )
    p.add_argument("--dry_run", action="store_true", help="print the commands and environment; start nothing")
    args = p.parse_args(own)
    if not command:
        p.error("no command given: put it after `--`")
    # The command runs as an argument list (no shell, no rendered script), so its arguments may hold newlines (a
    # `python -c` program); the log folder name is checked, as it is printed and joined into paths.
    m = _CONTROL.search(args.log_dir or "")
    if m:
        p.error(
            f"--log_dir {args.log_dir!r}: control character U+{ord(m.group()):04X} at position {m.start()}; "
            f"newlines, carriage returns, NUL and other control characters are not allowed in it"
        )
    if args.num_processes < 1:
        p.error(f"--num_processes must be >= 1, got {args.num_processes}")
    if args.devices_per_process < 1:
        p.error(f"--devices_per_process must be >= 1, got {args.devices_per_process}")
    if not 0 <= args.port < 65536:
        p.error(f"--port must be in [0, 65535], got {args.port}")
    return args, command


def plan(args, command: list[str], port: int) -> list[tuple[list[str], dict[str, str]]]:
    """[(argv, extra environment)] for every process."""
    out = []
    coordinator = f"127.0.0.1:{port}"
    for i in range(args.num_processes):
        env = {
            "MEMAGENT_COORDINATOR": coordinator,
            "MEMAGENT_NUM_PROCESSES": str(args.num_processes),
            "MEMAGENT_PROCESS_ID": str(i),
        }
        d = args.devices_per_process
        if args.platform == "cpu":
            env["JAX_PLATFORMS"] = "cpu"
            env["JAX_NUM_CPU_DEVICES"] = str(d)
        elif args.platform == "gpu":
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i * d + j) for j in range(d))
        argv = list(command)
        if args.pass_flags:
            argv += [
                f"--coordinator_address={coordinator}",
                f"--num_processes={args.num_processes}",
                f"--process_id={i}",
            ]
        out.append((argv, env))
    return out


def format_plan(processes) -> str:
    lines = []
    for i, (argv, env) in enumerate(processes):
        settings = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
        lines.append(f"[p{i}] {settings} {shlex.join(argv)}")
    return "\n".join(lines)


def _pump(index: int, stream, log_file, lock: threading.Lock) -> None:
    prefix = f"[p{index}] "
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace")
        log_file.write(line)
        log_file.flush()
        with lock:
            sys.stdout.write(prefix + line if line.endswith("\n") else prefix + line + "\n")
            sys.stdout.flush()
    stream.close()


def _signal_group(proc: subprocess.Popen, sig) -> None:
    try:
        os.killpg(proc.pid, sig)  # the process group we created for this child (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass


def stop_all(procs: list[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM to every live process group, then SIGKILL to what is left after `grace_s`."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in live:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(p, signal.SIGKILL)
            p.wait()


class _Terminated(Exception):
    pass


def _on_sigterm(signum, frame):
    raise _Terminated()


def run(processes, log_dir: str, grace_s: float) -> int:
    os.makedirs(log_dir, exist_ok=True)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)  # `kill <launcher>` tears the processes down too
    print(f"[launch] {len(processes)} processes; logs in {log_dir}", file=sys.stderr, flush=True)
    procs: list[subprocess.Popen] = []
    threads, files = [], []
    lock = threading.Lock()
    status = 0
    try:
        for i, (argv, extra) in enumerate(processes):
            env = dict(os.environ, **extra)
            log_file = open(os.path.join(log_dir, f"process_{i}.log"), "w", encoding="utf-8")
            files.append(log_file)
            proc = subprocess.Popen(
                argv,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            procs.append(proc)
            t = threading.Thread(target=_pump, args=(i, proc.stdout, log_file, lock), daemon=True)
            t.start()
            threads.append(t)
        remaining = set(range(len(procs)))
        while remaining:
            for i in sorted(remaining):
                code = procs[i].poll()
                if code is None:
                    continue
                remaining.discard(i)
                if code != 0:
                    print(
                        f"[launch] process {i} exited with status {code}; stopping the others",
                        file=sys.stderr,
                        flush=True,
                    )
                    stop_all(procs, grace_s)
                    status = code if code > 0 else 128 - code  # killed by a signal: 128 + signal number
                    remaining.clear()
                    break
            time.sleep(0.05)
    except (KeyboardInterrupt, _Terminated) as e:
        print("[launch] interrupted; stopping all processes", file=sys.stderr, flush=True)
        stop_all(procs, grace_s)
        status = 130 if isinstance(e, KeyboardInterrupt) else 143
    except BaseException:
        stop_all(procs, grace_s)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        for t in threads:
            t.join(timeout=5)
        for f in files:
            f.close()
    return status


def main(argv=None) -> int:
    args, command = parse_args(sys.argv[1:] if argv is None else argv)
    port = args.port or free_port()
    processes = plan(args, command, port)
    if args.dry_run:
        print(format_plan(processes))
        return 0
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="memagent-local-")
    return run(processes, log_dir, args.grace_s)


if __name__ == "__main__":
    sys.exit(main())
