#!/usr/bin/env python3
"""Cloud TPU pod launcher: the same training command on every worker of a TPU VM, through `gcloud`.

    # start: every worker runs `python -m memagent_jax.train ...` in the background, one log file per worker
    python launch/tpu_pod.py --tpu my-v5p-128 --zone us-east5-a [--project my-project] \\
        --config configs/qwen2_5_7b_hotpotqa.py:v5p-128 --workdir /mnt/my-bucket/runs/q7b \\
        --config.model.path=/mnt/ckpt/Qwen2.5-7B-Instruct --config.data.train_file=/mnt/data/hotpotqa_train.parquet

    python launch/tpu_pod.py --tpu my-v5p-128 --zone us-east5-a --collect_logs ./logs --num_workers 16
    python launch/tpu_pod.py --tpu my-v5p-128 --zone us-east5-a --teardown            # stop the job everywhere
    python launch/tpu_pod.py --tpu my-v5p-128 --zone us-east5-a --delete --yes        # delete the TPU VM

Every action is a list of `gcloud compute tpus tpu-vm ...` commands; `--dry_run` prints them, one per line,
shell-quoted, and runs nothing.

Start: on every worker (`--worker=all`), in `--remote_dir` (the repository, already set up there, e.g. by
`--setup 'git -C memagent-jax pull && make -C memagent-jax venv'`), the job runs detached (setsid nohup) with
MEMAGENT_DISTRIBUTED=1 (so `memagent_jax.distributed.initialize` calls `jax.distributed.initialize()`, which
finds the pod's topology itself), any `--env KEY=VALUE`, and its output in `<log_dir>/worker-<N>.log`, N = the
worker number from the metadata server; its process id goes to `<log_dir>/worker-<N>.pid`. Arguments of the
form `--config.a.b=value` are passed to the entry point unchanged (quoted for the remote shell).

Logs: `--collect_logs DIR` copies every worker's log into DIR (`gcloud ... scp`, one command per worker;
`--num_workers` says how many: 4 chips per host on v4 / v5p, so v5p-128 (64 chips) has 16).
Teardown: `--teardown` stops the job on every worker (SIGTERM to its process group, SIGKILL after
`--grace_s`). `--delete --yes` deletes the TPU VM (`--delete` without `--yes` is refused).
Paths on the workers: `--remote_dir` is relative to the home directory unless absolute; `--log_dir` is relative
to `--remote_dir` unless absolute.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys

WORKER_NUMBER = (
    "$(curl -sf -H Metadata-Flavor:Google "
    "http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number"
    " || hostname)"
)
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_OVERRIDE = re.compile(r"^--config(\.[A-Za-z0-9_]+)+=")


class LaunchError(ValueError):
    """A bad combination of launcher arguments; the message says which."""


# Values that become gcloud arguments of their own: a strict pattern each, so that none can start with '-' (gcloud
# would read it as a flag: --tpu=--impersonate-service-account=... ) or carry a space, quote or shell character.
# gcloud's ssh / scp give `--` a meaning of their own (what follows goes to ssh), so the names are checked instead.
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")  # TPU VM names and zones (us-east5-a)
_PROJECT = re.compile(r"^([a-z0-9][a-z0-9.-]*:)?[a-z0-9][a-z0-9-]{0,62}$")  # project ids (domain:project too)
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
NAME_PATTERNS = {
    "tpu": (_NAME, "a TPU VM name: lower-case letters, digits and '-', starting with a letter or digit"),
    "zone": (_NAME, "a zone such as us-east5-a: lower-case letters, digits and '-'"),
    "project": (_PROJECT, "a project id: lower-case letters, digits and '-' (optionally after 'domain:')"),
    "module": (_MODULE, "a Python module name such as memagent_jax.train"),
}


def check_names(args) -> None:
    """LaunchError naming the first of --tpu / --zone / --project / --module that does not match its pattern, and
    for --collect_logs a folder that starts with '-' (it is a positional argument of gcloud scp)."""
    for name, (pattern, what) in NAME_PATTERNS.items():
        value = getattr(args, name)
        if value is not None and not pattern.match(value):
            raise LaunchError(f"--{name} {value!r}: expected {what}")
    if args.collect_logs is not None and (not args.collect_logs or args.collect_logs.startswith("-")):
        raise LaunchError(f"--collect_logs {args.collect_logs!r}: a folder name must not start with '-' (use ./...)")


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
            f"that reach the remote shell"
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch/tpu_pod.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tpu", required=True, help="TPU VM name")
    p.add_argument("--zone", required=True, help="its zone, e.g. us-east5-a")
    p.add_argument("--project", default=None, help="GCP project (default: gcloud's configured project)")
    p.add_argument("--internal_ip", action="store_true", help="reach the workers by internal IP (gcloud --internal-ip)")
    p.add_argument("--config", default=None, help="config file[:arg] for the entry point (start)")
    p.add_argument(
        "--workdir",
        default=None,
        help="workdir for the entry point, a path every worker sees, e.g. a gcsfuse mount /mnt/bucket/runs/x (start)",
    )
    p.add_argument("--module", default="memagent_jax.train", help="entry point module (default memagent_jax.train)")
    p.add_argument("--remote_dir", default="memagent-jax", help="repository on the workers (default ~/memagent-jax)")
    p.add_argument("--python", default=".venv/bin/python", help="interpreter on the workers, relative to remote_dir")
    p.add_argument("--log_dir", default="logs/tpu_pod", help="log folder on the workers (relative to remote_dir)")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment variable for the job (repeatable)",
    )
    p.add_argument(
        "--setup",
        default=None,
        metavar="COMMAND",
        help="a shell command run on every worker (in the home directory) before the job starts",
    )
    p.add_argument("--collect_logs", default=None, metavar="DIR", help="copy every worker's log into DIR")
    p.add_argument("--num_workers", type=int, default=None, help="hosts of the TPU VM (for --collect_logs)")
    p.add_argument("--teardown", action="store_true", help="stop the job on every worker")
    p.add_argument("--grace_s", type=int, default=30, help="seconds between SIGTERM and SIGKILL on --teardown")
    p.add_argument("--delete", action="store_true", help="delete the TPU VM (needs --yes)")
    p.add_argument("--yes", action="store_true", help="confirm --delete")
    p.add_argument("--dry_run", action="store_true", help="print the commands, one per line; run nothing")
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
        check(args, overrides)
    except LaunchError as e:  # one line, exit status 2
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return args, overrides


def check(args, overrides: list[str]) -> None:
    for name in (
        "tpu",
        "zone",
        "project",
        "config",
        "workdir",
        "module",
        "remote_dir",
        "python",
        "log_dir",
        "setup",
        "collect_logs",
    ):
        reject_control_characters(f"--{name}", getattr(args, name))
    for item in args.env:
        reject_control_characters("--env", item)
    for item in overrides:
        reject_control_characters("config override", item)
    check_names(args)
    actions = [
        name
        for name, on in (
            ("--collect_logs", args.collect_logs is not None),
            ("--teardown", args.teardown),
            ("--delete", args.delete),
        )
        if on
    ]
    start = not actions
    if "--collect_logs" in actions and len(actions) > 1:
        others = " / ".join(a for a in actions if a != "--collect_logs")
        raise LaunchError(f"--collect_logs cannot be combined with {others}")
    if args.delete and not args.yes:
        raise LaunchError(f"refusing to delete TPU VM {args.tpu!r} without --yes")
    if args.collect_logs is not None:
        if args.num_workers is None:
            raise LaunchError("--collect_logs needs --num_workers (the TPU VM's host count, e.g. 16 for v5p-128)")
        if args.num_workers < 1:
            raise LaunchError(f"--num_workers must be >= 1, got {args.num_workers}")
    if start:
        if not args.config or not args.workdir:
            missing = [f for f, v in (("--config", args.config), ("--workdir", args.workdir)) if not v]
            raise LaunchError(
                f"starting a job needs {' and '.join(missing)} (or choose --collect_logs, --teardown, --delete)"
            )
    elif overrides or args.config or args.workdir or args.setup:
        raise LaunchError(
            f"--config, --workdir, --setup and config overrides only apply when starting a job, not with "
            f"{' / '.join(actions)}"
        )
    for item in args.env:
        key, sep, _ = item.partition("=")
        if not sep or not _ENV_KEY.match(key):
            raise LaunchError(f"--env {item!r}: expected KEY=VALUE with KEY a shell variable name")
    if args.grace_s < 0:
        raise LaunchError(f"--grace_s must be >= 0, got {args.grace_s}")


def _gcloud(args, verb: str, *rest: str) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", verb, *rest, f"--zone={args.zone}"]
    if args.project:
        cmd.append(f"--project={args.project}")
    return cmd


def _ssh(args, worker: str, command: str) -> list[str]:
    cmd = _gcloud(args, "ssh", args.tpu)
    if args.internal_ip:
        cmd.append("--internal-ip")
    return cmd + [f"--worker={worker}", "--command", command]


def _remote_log_dir(args) -> str:
    return shlex.quote(args.log_dir)


def start_command(args, overrides: list[str]) -> str:
    """The shell line each worker runs to start the job (detached, logged, its pid recorded)."""
    job = [args.python, "-m", args.module, f"--config={args.config}", f"--workdir={args.workdir}", *overrides]
    env = ["MEMAGENT_DISTRIBUTED=1"] + [f"{k}={shlex.quote(v)}" for k, _, v in (e.partition("=") for e in args.env)]
    for value in [*job, *args.env, args.remote_dir, args.log_dir]:  # whatever the caller
        reject_control_characters("a value of the remote command", value)
    return (
        f'set -e; cd {shlex.quote(args.remote_dir)}; LOGS={_remote_log_dir(args)}; mkdir -p "$LOGS"; '
        f"WORKER={WORKER_NUMBER}; export {' '.join(env)}; "
        f'setsid nohup {shlex.join(job)} > "$LOGS/worker-$WORKER.log" 2>&1 < /dev/null & '
        f'echo $! > "$LOGS/worker-$WORKER.pid"; '
        f'echo "worker $WORKER: pid $(cat "$LOGS/worker-$WORKER.pid"), '
        f'log $(cd "$LOGS" && pwd)/worker-$WORKER.log"'
    )


def teardown_command(args) -> str:
    """The shell line each worker runs to stop the job: SIGTERM to the recorded process groups, SIGKILL later."""
    return (
        f"cd {shlex.quote(args.remote_dir)} || exit 0; LOGS={_remote_log_dir(args)}; "
        f'for f in "$LOGS"/worker-*.pid; do [ -f "$f" ] && kill -TERM -- -"$(cat "$f")" 2>/dev/null; '
        f"done; sleep {args.grace_s}; "
        f'for f in "$LOGS"/worker-*.pid; do [ -f "$f" ] || continue; '
        f'kill -KILL -- -"$(cat "$f")" 2>/dev/null; rm -f "$f"; done; echo stopped'
    )


def commands(args, overrides: list[str]) -> list[list[str]]:
    """Every command of the requested action, in order."""
    if args.collect_logs is not None:
        remote = args.log_dir if os.path.isabs(args.log_dir) else f"{args.remote_dir}/{args.log_dir}"
        out = []
        for i in range(args.num_workers):
            cmd = _gcloud(args, "scp", f"{args.tpu}:{remote}/worker-*.log", args.collect_logs.rstrip("/") + "/")
            if args.internal_ip:
                cmd.append("--internal-ip")
            out.append(cmd + [f"--worker={i}"])
        return out
    if args.teardown or args.delete:
        out = []
        if args.teardown:
            out.append(_ssh(args, "all", teardown_command(args)))
        if args.delete:
            out.append(_gcloud(args, "delete", args.tpu) + ["--quiet"])
        return out
    out = []
    if args.setup:
        out.append(_ssh(args, "all", args.setup))
    out.append(_ssh(args, "all", start_command(args, overrides)))
    return out


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    cmds = commands(args, overrides)
    if args.dry_run:
        for cmd in cmds:
            print(shlex.join(cmd))
        return 0
    if args.collect_logs is not None:
        os.makedirs(args.collect_logs, exist_ok=True)
    for cmd in cmds:
        print(f"[tpu_pod] {shlex.join(cmd)}", file=sys.stderr, flush=True)
        try:
            code = subprocess.run(cmd).returncode
        except FileNotFoundError:
            print("[tpu_pod] error: gcloud is not installed or not on PATH", file=sys.stderr)
            return 127
        if code != 0:
            print(f"[tpu_pod] error: the command above exited with status {code}", file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
