#!/usr/bin/env python3
"""SLURM launcher for multi-node GPU runs: renders an sbatch script and submits it.

    python launch/slurm.py --nodes 4 --partition gpu --time 48:00:00 \\
        --config configs/qwen2_5_7b_hotpotqa.py:32xh100 --workdir /shared/runs/q7b \\
        --config.model.path=/shared/ckpt/Qwen2.5-7B-Instruct --config.data.train_file=/shared/data/train.parquet
    python launch/slurm.py ... --dry_run          # print the script and the sbatch command; submit nothing

Layout: ONE process per node (`--ntasks-per-node=1`), each driving all `--gpus_per_node` GPUs of its node;
`jax.distributed.initialize()` (called by `memagent_jax.distributed.initialize` in every entry point) detects
SLURM by itself (coordinator = the first node of the step, process id = SLURM_PROCID). JAX's SLURM detection
would otherwise give each process only the GPU numbered SLURM_LOCALID (it assumes one process per GPU), so the
script sets MEMAGENT_LOCAL_DEVICE_IDS=0,...,G-1. One node runs as a plain single process over its G GPUs.

The script also sets XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.92: JAX otherwise preallocates 75% of each GPU,
and the planner's budget is 90%), any `--env KEY=VALUE`, `cd`s into the repository (`--repo_dir`, default: this
checkout) and runs `srun <python> -m <module> --config=... --workdir=... [--config.a.b=value ...]` with one
log file per node (`<log_dir>/<job_name>-<jobid>-node<N>.log`) beside SLURM's own `<job_name>-<jobid>.out`.
The script is written to `--script` (default `<log_dir>/<job_name>.sbatch`), then `sbatch <script>` submits it.
A config argument of the form `:<N>xh100` (configs/*_hotpotqa.py) must match nodes x gpus_per_node.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys

_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_OVERRIDE = re.compile(r"^--config(\.[A-Za-z0-9_]+)+=")
_GPU_ARG = re.compile(r":(\d+)x(h100|h200|a100)$", re.IGNORECASE)
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class LaunchError(ValueError):
    """A bad combination of launcher arguments; the message says which."""


# Values that become sbatch options: a strict pattern each, so that none can start with '-' or carry a space, quote
# or shell character (an option of its own in the #SBATCH line, or a command in the script).
_SLURM_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
NAME_PATTERNS = {
    "job_name": (
        re.compile(rf"^{_SLURM_NAME}$"),
        "a job name: letters, digits, '.', '_' and '-', not starting with '-'",
    ),
    "partition": (
        re.compile(rf"^{_SLURM_NAME}(,{_SLURM_NAME})*$"),
        "a partition name (or a comma list): letters, digits, '.', '_' and '-'",
    ),
    "account": (re.compile(rf"^{_SLURM_NAME}$"), "an account name: letters, digits, '.', '_' and '-'"),
    "time": (
        re.compile(r"^(\d+(-\d+)?(:\d+){0,2}|(?i:unlimited|infinite))$"),
        "a time limit such as 48:00:00, 2-00:00:00 or 90 (minutes)",
    ),
    "mem": (re.compile(r"^\d+[KMGT]?$"), "a memory size such as 0 (all), 512G or 1000000M"),
    "module": (
        re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"),
        "a Python module name such as memagent_jax.train",
    ),
}


def check_names(args) -> None:
    """LaunchError naming the first of --job_name / --partition / --account / --time / --mem / --module that does
    not match its pattern."""
    for name, (pattern, what) in NAME_PATTERNS.items():
        value = getattr(args, name)
        if value is not None and not pattern.match(value):
            raise LaunchError(f"--{name} {value!r}: expected {what}")


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def reject_control_characters(field: str, value) -> None:
    """LaunchError when `value` holds a control character (newline, carriage return, NUL, tab, any other C0 or
    DEL): in a rendered script or a shell command line it could end a line and start a command of its own."""
    if value is None:
        return
    m = _CONTROL.search(str(value))
    if m:
        raise LaunchError(
            f"{field} {str(value)!r}: control character U+{ord(m.group()):04X} at position {m.start()}; "
            f"newlines, carriage returns, NUL and other control characters are not allowed in values "
            f"that reach the sbatch script"
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/slurm.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--nodes", type=int, required=True, help="nodes")
    p.add_argument("--gpus_per_node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--config", required=True, help="config file[:arg] for the entry point")
    p.add_argument("--workdir", required=True, help="workdir for the entry point (on a shared filesystem)")
    p.add_argument("--module", default="memagent_jax.train", help="entry point module (default memagent_jax.train)")
    p.add_argument("--job_name", default="memagent", help="SLURM job name")
    p.add_argument("--partition", default=None, help="SLURM partition")
    p.add_argument("--account", default=None, help="SLURM account")
    p.add_argument("--time", default=None, help="time limit, e.g. 48:00:00")
    p.add_argument("--cpus_per_task", type=int, default=None, help="CPUs for each node's process")
    p.add_argument("--mem", default=None, help="host memory per node, e.g. 0 (all) or 1000G")
    p.add_argument("--no_exclusive", action="store_true", help="do not ask for whole nodes (#SBATCH --exclusive)")
    p.add_argument(
        "--sbatch_arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra #SBATCH line, e.g. --sbatch_arg=--qos=high (repeatable)",
    )
    p.add_argument("--repo_dir", default=_REPO, help="the repository on the nodes (default: this checkout)")
    p.add_argument("--python", default=".venv/bin/python", help="interpreter, relative to repo_dir (or absolute)")
    p.add_argument("--log_dir", default="logs/slurm", help="SLURM and per-node logs (relative to repo_dir)")
    p.add_argument("--mem_fraction", default="0.92", help="XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.92)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra environment variable")
    p.add_argument(
        "--script",
        default=None,
        help="where to write the sbatch script (default <repo_dir>/<log_dir>/<job_name>.sbatch)",
    )
    p.add_argument("--dry_run", action="store_true", help="print the script and the sbatch command; submit nothing")
    return p


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(arguments, config overrides). Unknown arguments must be `--config.a.b=value` overrides."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    overrides = []
    for a in unknown:
        if _OVERRIDE.match(a):
            overrides.append(a)
        elif a.startswith("--config."):
            parser.error(f"config override {a!r} needs a value: write it as --config.a.b=value")
        else:
            parser.error(f"unrecognized argument {a!r} (config overrides are --config.a.b=value)")
    try:
        check(args)
        for item in overrides:
            reject_control_characters("config override", item)
    except LaunchError as e:  # one line, exit status 2
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return args, overrides


def check(args) -> None:
    for name in (
        "config",
        "workdir",
        "module",
        "job_name",
        "partition",
        "account",
        "time",
        "mem",
        "repo_dir",
        "python",
        "log_dir",
        "mem_fraction",
        "script",
    ):
        reject_control_characters(f"--{name}", getattr(args, name))
    for item in args.env:
        reject_control_characters("--env", item)
    for item in args.sbatch_arg:
        reject_control_characters("--sbatch_arg", item)
    check_names(args)
    if args.nodes < 1:
        raise LaunchError(f"--nodes must be >= 1, got {args.nodes}")
    if args.gpus_per_node < 1:
        raise LaunchError(f"--gpus_per_node must be >= 1, got {args.gpus_per_node}")
    m = _GPU_ARG.search(args.config)
    if m and int(m.group(1)) != args.nodes * args.gpus_per_node:
        raise LaunchError(
            f"--config {args.config} is set up for {m.group(1)} GPUs, but --nodes {args.nodes} x "
            f"--gpus_per_node {args.gpus_per_node} = {args.nodes * args.gpus_per_node}"
        )
    try:
        fraction = float(args.mem_fraction)
    except ValueError:
        fraction = -1.0
    if not 0 < fraction <= 1:
        raise LaunchError(f"--mem_fraction must be a number in (0, 1], got {args.mem_fraction!r}")
    for item in args.env:
        key, sep, _ = item.partition("=")
        if not sep or not _ENV_KEY.match(key):
            raise LaunchError(f"--env {item!r}: expected KEY=VALUE with KEY a shell variable name")
    for item in args.sbatch_arg:
        if not item.startswith("--") or "\n" in item:
            raise LaunchError(f"--sbatch_arg {item!r}: expected one sbatch option such as --qos=high")
    if args.cpus_per_task is not None and args.cpus_per_task < 1:
        raise LaunchError(f"--cpus_per_task must be >= 1, got {args.cpus_per_task}")


def script_path(args) -> str:
    if args.script:
        return args.script
    return os.path.join(args.repo_dir, args.log_dir, f"{args.job_name}.sbatch")


def render(args, overrides: list[str]) -> str:
    """The sbatch script."""
    sb = [
        f"--job-name={args.job_name}",
        f"--nodes={args.nodes}",
        "--ntasks-per-node=1",
        f"--gpus-per-node={args.gpus_per_node}",
    ]
    if args.cpus_per_task:
        sb.append(f"--cpus-per-task={args.cpus_per_task}")
    if args.mem is not None:
        sb.append(f"--mem={args.mem}")
    if not args.no_exclusive:
        sb.append("--exclusive")
    for name in ("partition", "account", "time"):
        if getattr(args, name):
            sb.append(f"--{name}={getattr(args, name)}")
    sb.append(f"--chdir={args.repo_dir}")
    sb.append(f"--output={args.log_dir}/{args.job_name}-%j.out")
    sb += args.sbatch_arg
    devices = ",".join(str(i) for i in range(args.gpus_per_node))
    env = [("XLA_PYTHON_CLIENT_MEM_FRACTION", args.mem_fraction), ("MEMAGENT_LOCAL_DEVICE_IDS", devices)]
    env += [(k, v) for k, _, v in (e.partition("=") for e in args.env)]
    job = [args.python, "-m", args.module, f"--config={args.config}", f"--workdir={args.workdir}", *overrides]
    srun = [
        "srun",
        "--nodes",
        str(args.nodes),
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        f"--output={args.log_dir}/{args.job_name}-%j-node%n.log",
    ]
    for value in [*sb, *(v for _, v in env), *job, *srun, args.repo_dir, args.log_dir]:  # whatever the caller
        reject_control_characters("a value of the sbatch script", value)
    lines = ["#!/bin/bash"]
    lines += [f"#SBATCH {shlex.quote(x)}" for x in sb]
    lines += [
        "# Rendered by launch/slurm.py: one JAX process per node, each driving every GPU of its node;",
        "# jax.distributed.initialize() takes the coordinator and process ids from SLURM.",
        "set -euo pipefail",
        f"cd {shlex.quote(args.repo_dir)}",
        f"mkdir -p {shlex.quote(args.log_dir)}",
    ]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env]
    lines.append('echo "job $SLURM_JOB_ID: $SLURM_JOB_NUM_NODES nodes ($SLURM_JOB_NODELIST)"')
    lines.append(f"{shlex.join(srun)} \\\n    {shlex.join(job)}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    text = render(args, overrides)
    path = script_path(args)
    submit = ["sbatch", path]
    if args.dry_run:
        print(f"# {path}")
        print(text, end="")
        print(shlex.join(submit))
        return 0
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    os.makedirs(os.path.join(args.repo_dir, args.log_dir), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"[slurm] wrote {path}; {shlex.join(submit)}", file=sys.stderr, flush=True)
    try:
        return subprocess.run(submit).returncode
    except FileNotFoundError:
        print(
            "[slurm] error: sbatch is not installed or not on PATH (the script is written; submit it by hand)",
            file=sys.stderr,
        )
        return 127


if __name__ == "__main__":
    sys.exit(main())
