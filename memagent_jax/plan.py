"""Capacity planner: does a training config fit its hardware, and how long will a step take?

    python -m memagent_jax.plan --config configs/qwen2_5_7b_hotpotqa.py:v5p-128 [--config.x=y ...]
        [--hardware NAME] [--devices N] [--mfu 0.4] [--doc_tokens 32000] [--usable_fraction 0.9] [--json]

For one config (model shape from `config.model.preset`, or `config.json` in `config.model.path` when it exists)
and its mesh, it estimates the bytes each device holds, under the sharding rules of `models.sharding` (params
over fsdp x tensor, rows over data x fsdp), phase by phase, the way `train.py` runs a step:

  persistent   params (param dtype), AdamW mu + nu (optax keeps them in the param dtype), the frozen reference
               params when rl.kl_coef > 0 (a copy in the param dtype), and the agent's two KV caches (the memory-
               update cache and the final-answer cache stay allocated between steps);
  rollout      + the activations of the largest agent program: the prefill of a chunk step's rest of the prompt
               (memory + chunk + template pieces) against every slot of the update cache;
  learner      + f32 gradients (+ an f32 accumulator with micro-batches), the step's conversation batch, and
               max(activations of one micro-batch under the remat policy, the optimiser update's temporaries).

With config.mesh.rollout_devices > 0 (the rollout on its own mesh) the KV caches, the rollout activations and the
copied params (old and new copy) sit on the rollout devices, the rest on the learner's. The rollout runs
config.rl.rollout_batch_size trajectories per agent call (default: the whole step, questions x group, at once).

and the FLOPs of a step: rollout prefill (every chunk step, every compiled segment), rollout decode (memory
and answer tokens, worst case: every generation uses its whole budget), and learning (forward + backward,
remat recompute, reference and old-log-prob forwards). Prefill and learning time = FLOPs / (devices x peak x
MFU); decode time = steps x max(bytes read per device / HBM bandwidth, FLOPs / peak).

Every number comes from small pure functions in `memagent_jax.planning` (this module is the command); they
mirror the code (models/attention.py's paths: the materialised scores, or one live block for blockwise / cuDNN,
as config.model.attention_impl resolves on the planned hardware; learner.py's accumulation, agent/program.py's
cache layout), so change them together.
Estimates: XLA's buffer assignment can do better (fusion) or worse (fragmentation, copies); the usable
fraction (default 0.9 of HBM) is the margin. Interconnect traffic (FSDP all-gathers, tensor-parallel
all-reduces) is not timed.

Exit status: 0 fits, 1 does not fit, 2 the config is invalid (one line naming the field; --debug: the traceback).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from memagent_jax import errors
from memagent_jax.planning import HARDWARE, format_plan, make_plan, resolve_mesh

# ------------------------------------------------------------------------------------------------ CLI


@errors.user_errors
def main(argv: Sequence[str] | None = None) -> int:
    """Parses `argv` (argv[0] is the program name) with a private FlagValues; prints the plan; returns the exit
    status (0 fits, 1 does not fit, 2 invalid config or flags)."""
    from absl import flags
    from ml_collections import config_flags

    argv = list(sys.argv if argv is None else argv)
    fv = flags.FlagValues()
    config_flag = config_flags.DEFINE_config_file(
        "config", None, "training config file (as for train.py)", flag_values=fv, lock_config=True, sys_argv=argv
    )
    flags.DEFINE_string(
        "hardware", None, f"device kind (default: config.hardware); one of {', '.join(HARDWARE)}", flag_values=fv
    )
    flags.DEFINE_integer("devices", None, "device count (only needed when config.mesh has a -1 axis)", flag_values=fv)
    flags.DEFINE_float("mfu", 0.4, "fraction of peak FLOP/s reached by prefill and learning", flag_values=fv)
    flags.DEFINE_integer(
        "doc_tokens", 32000, "tokens of a training document (sets the chunks per trajectory)", flag_values=fv
    )
    flags.DEFINE_float("usable_fraction", 0.9, "fraction of HBM the plan may use", flag_values=fv)
    flags.DEFINE_boolean("json", False, "print the plan as JSON", flag_values=fv)
    if any(a in ("-h", "--help", "-help", "--helpshort", "--helpfull") for a in argv[1:]):
        print(
            f"usage: {os.path.basename(argv[0]) if argv else 'plan'} --config FILE[:ARG] [--config.x=y ...] "
            f"[flags]\n\n{__doc__.strip()}\n\nflags:"
        )
        print(fv.get_help())
        print("\n`memagent plan --config FILE --print-config` lists the config's fields with defaults.")
        return 0
    errors.check_config_overrides(argv[1:])  # a typo in --config.a.b: one line naming the flag and the file
    try:
        rest = fv(argv)
    except (flags.Error, ValueError) as e:  # ValueError: a config's get_config refusing its argument (hardware)
        return errors.handle(errors.UserError(errors.flag_error_message(e)))
    if len(rest) > 1:
        print(f"error: unexpected arguments {rest[1:]}", file=sys.stderr)
        return 2
    if fv["config"].value is None:
        print("error: --config is required, e.g. --config configs/qwen2_5_7b_hotpotqa.py:v5p-128", file=sys.stderr)
        return 2
    cfg = config_flag.value
    name = config_arg(argv) or "config"
    from memagent_jax.rl.recipe import validate_config

    try:
        extra = int(cfg.mesh.get("rollout_devices", 0) or 0)
        devices = fv["devices"].value
        mesh = resolve_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices - extra if devices else None)
        validate_config(cfg, device_count=mesh.size + extra, check_files=False)
        plan = make_plan(
            cfg,
            hardware=fv["hardware"].value,
            devices=mesh.size + extra,
            mfu=fv["mfu"].value,
            doc_tokens=fv["doc_tokens"].value,
            usable_fraction=fv["usable_fraction"].value,
            name=name,
        )
    except errors.user_error_types() as e:  # PlanError, TrainConfigError, ...: one line, exit status 2
        return errors.handle(e)
    if fv["json"].value:
        print(json.dumps(plan.to_json(), indent=1))
    else:
        print(format_plan(plan))
    return 0 if plan.fits else 1


def config_arg(argv: Sequence[str]) -> str | None:
    """The value of `--config=X` or `--config X` in argv (None when absent)."""
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


if __name__ == "__main__":
    sys.exit(main())
