"""Train a memory agent with multi-conversation GRPO.

    python -m memagent_jax.train --config configs/grpo.py --workdir runs/x [--config.a.b=value ...]

Each step: Q questions from the data iterator -> G agent trajectories each (the chunk scan, sampling) ->
rewards from the verifier (thread pool) -> group-relative advantages -> every conversation of every
trajectory becomes a training row carrying its trajectory's advantage -> one jitted learner step (mini-batch
updates, gradient accumulation). The rollout runs on the learner's params in place (no host copy).

The workdir holds `checkpoints/` (Orbax: train state, data-iterator position, RNG; the last N kept),
`metrics.jsonl` and TensorBoard events, and `export/` (the final model as a Hugging Face folder). Restarting
with the same workdir resumes from the newest finished checkpoint and continues exactly where it stopped.

Multi-host: run the same command on every host (one process per host, or `launch/local.py` for several
processes on one machine) with --coordinator_address/--num_processes/--process_id or the MEMAGENT_* variables
(see `memagent_jax.distributed`). Each process reads its own share of the questions (questions_per_step /
processes), rolls them out on the shared mesh, and feeds its own conversations to the learner; process 0 writes
the metrics and the export, every process takes part in checkpointing. `config.mesh.rollout_devices` > 0 puts
the rollout on its own devices (its own mesh) and copies the learner's params there every step.
"""

from __future__ import annotations

import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from memagent_jax import distributed, errors
from memagent_jax.rl.trainer import train

_CONFIG = _WORKDIR = None


def define_flags() -> None:
    """Registers the command-line flags (only when run as a program, so other entry points can import `train`)."""
    global _CONFIG, _WORKDIR
    from memagent_jax import configs

    sys.argv = configs.resolve_argv(sys.argv)
    _CONFIG = config_flags.DEFINE_config_file(
        "config", configs.path_of("grpo"), "training config file", lock_config=True
    )
    _WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and the exported model")
    distributed.define_flags()  # --coordinator_address / --num_processes / --process_id (multi-host runs)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    if not flags.FLAGS["verbosity"].present:  # keep Orbax's per-save INFO lines off the progress output
        absl_logging.set_verbosity(absl_logging.WARNING)
    with errors.report_user_errors():  # a bad config, model folder or checkpoint: one line, exit status 2
        distributed.initialize_from_flags()  # multi-host runs: join the other processes (no-op for one process)
        train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    errors.run_absl(main, define_flags, default_config="grpo")
