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

Every number comes from small pure functions in `memagent_jax.distributed.planner` (re-exported here; this module is the
command and its presentation); they mirror the code (models/attention.py's paths: the
materialised scores, or one live block for blockwise / cuDNN, as config.model.attention_impl resolves on the
planned hardware; learner.py's accumulation, agent/program.py's cache layout), so change them together.
Estimates: XLA's buffer assignment can do better (fusion) or worse (fragmentation, copies); the usable
fraction (default 0.9 of HBM) is the margin. Interconnect traffic (FSDP all-gathers, tensor-parallel
all-reduces) is not timed.

Exit status: 0 fits, 1 does not fit, 2 the config is invalid.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Sequence

from memagent_jax.distributed.planner import *  # noqa: F401,F403  (the arithmetic: this module's API too)
from memagent_jax.distributed.planner import HARDWARE, GiB, Plan, PlanError, make_plan, param_count, resolve_mesh


# ---------------------------------------------------------------------------------------------- output


def _gib(n: int) -> str:
    return f"{n / GiB:8.2f}"


def _si(n: float, unit: str) -> str:
    for scale, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {prefix}{unit}"
    return f"{n:.0f} {unit}"


def _duration(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.2f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s"


def format_plan(plan: Plan) -> str:
    mc, hw, st, mem, notes = plan.model, plan.hardware, plan.settings, plan.memory, plan.notes
    lines = [f"memagent-jax plan: {plan.name}"]
    lines.append(f"  model     {plan.model_name}: {param_count(mc) / 1e9:.2f} B params (L {mc.num_layers}, "
                 f"D {mc.hidden_size}, H {mc.num_heads} / KV {mc.num_kv_heads} x {mc.head_dim}, "
                 f"F {mc.intermediate_size}, V {mc.vocab_size}); params {mc.param_dtype}, compute "
                 f"{mc.compute_dtype}, remat {mc.remat}, attention {mc.attention_impl} (rollout "
                 f"{st['rollout_attention']}, learner {st['learner_attention']})")
    lines.append(f"  hardware  {st['devices']} x {hw.name} ({hw.description}): {hw.hbm_bytes / GiB:.1f} GiB HBM, "
                 f"{hw.peak_flops / 1e12:.0f} TFLOP/s bf16, {hw.hbm_bandwidth / 1e9:.0f} GB/s each")
    lines.append(f"  mesh      {plan.mesh} (rows over {plan.mesh.batch_shards} batch shards)")
    if st["rollout_devices"]:
        lines.append(f"  rollout   on its own {st['rollout_devices']} devices: {plan.rollout_mesh}")
    lay = plan.layout
    lines.append(f"  step      {st['trajectories']} trajectories x ({st['chunks']} chunks + final) of a "
                 f"{st['doc_tokens']}-token document = {st['conversations']} conversations")
    lines.append(f"  layout    update prompt {lay.prefix} + {lay.rest} tokens, {lay.update_slots} cache slots; final "
                 f"prompt {lay.final_prompt}, {lay.final_slots} slots; learner rows of {st['learn_length']} tokens")
    lines.append(f"  rollout   {st['rollout_calls']} agent call(s) of {st['rollout_batch_size']} trajectories "
                 f"({st['rollout_rows_per_device']} rows per device)")
    lines.append(f"  learner   {st['learner_rows']} rows = {st['minibatches']} mini-batches x {st['micro_batches']} "
                 f"micro-batches x {st['micro_batch_rows']} rows ({st['micro_rows_per_device']} per device)")
    lines.append("")
    lines.append("  memory per device                GiB   what")
    rows = [("params", "params"), ("optimizer", "AdamW state"), ("reference", "reference params")]
    if st["rollout_devices"]:
        rows += [("persistent", "= persistent"), ("rollout_params", "rollout params")]
    rows += [("kv_update", "KV cache, update"), ("kv_final", "KV cache, final")]
    if not st["rollout_devices"]:
        rows += [("persistent", "= persistent")]
    rows += [("rollout_activations", "+ rollout activations")]
    if mem.get("decode_copies"):
        rows += [("decode_copies", "  of which decode copies")]
    rows += [("rollout_peak", "= rollout peak"),
            ("gradients", "+ gradients"), ("grad_accumulator", "+ grad accumulator"),
            ("learner_batch", "+ learner batch"), ("learner_activations", "+ max(activations"),
            ("update_temporaries", "        update temps)"), ("learner_peak", "= learner peak")]
    for key, label in rows:
        lines.append(f"  {label:28s} {_gib(mem[key])}   {notes.get(key, '')}")
    lines.append(f"  {'PEAK':28s} {_gib(mem['peak'])}   of {plan.usable_bytes / GiB:.1f} GiB usable "
                 f"({hw.hbm_bytes / GiB:.1f} GiB HBM)")
    lines.append("")
    lines.append("  compute per step                FLOPs        time")
    s, f = plan.seconds, plan.flops
    lines.append(f"  rollout prefill        {_si(f['rollout_prefill'], 'FLOP'):>16s}   "
                 f"{_duration(s['rollout_prefill']):>9s}   at MFU {st['mfu']:.2f}")
    lines.append(f"  rollout decode         {_si(f['rollout_decode'], 'FLOP'):>16s}   "
                 f"{_duration(s['rollout_decode']):>9s}   {st['rollout_calls']} x {st['decode_steps_per_call']} steps, "
                 f"{st['decode_bytes_per_step'] / 1e9:.2f} GB read per step per device (HBM-bound)")
    lines.append(f"  learning               {_si(f['learning'], 'FLOP'):>16s}   {_duration(s['learning']):>9s}"
                 f"   train {_si(f['learning_train'], 'FLOP')}, remat {_si(f['learning_remat'], 'FLOP')}, "
                 f"reference {_si(f['learning_reference'], 'FLOP')}, old log-probs "
                 f"{_si(f['learning_old_logprobs'], 'FLOP')}")
    lines.append(f"  step                   {_si(f['total'], 'FLOP'):>16s}   {_duration(s['step']):>9s}")
    if st["fsdp_gather_bytes_per_decode_step"]:
        lines.append(f"  (not timed: FSDP all-gathers {st['fsdp_gather_bytes_per_decode_step'] / 1e9:.2f} GB of "
                     f"weights into each device per decode step and per forward)")
    for w in plan.warnings:
        lines.append(f"  WARNING: {w}")
    lines.append("")
    lines.append(f"verdict: {plan.verdict}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CLI


def main(argv: Sequence[str] | None = None) -> int:
    """Parses `argv` (argv[0] is the program name) with a private FlagValues; prints the plan; returns the exit
    status (0 fits, 1 does not fit, 2 invalid config or flags)."""
    from absl import flags
    from ml_collections import config_flags

    argv = list(sys.argv if argv is None else argv)
    fv = flags.FlagValues()
    config_flag = config_flags.DEFINE_config_file("config", None, "training config file (as for train.py)",
                                                  flag_values=fv, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("hardware", None, f"device kind (default: config.hardware); one of {', '.join(HARDWARE)}",
                        flag_values=fv)
    flags.DEFINE_integer("devices", None, "device count (only needed when config.mesh has a -1 axis)",
                         flag_values=fv)
    flags.DEFINE_float("mfu", 0.4, "fraction of peak FLOP/s reached by prefill and learning", flag_values=fv)
    flags.DEFINE_integer("doc_tokens", 32000, "tokens of a training document (sets the chunks per trajectory)",
                         flag_values=fv)
    flags.DEFINE_float("usable_fraction", 0.9, "fraction of HBM the plan may use", flag_values=fv)
    flags.DEFINE_boolean("json", False, "print the plan as JSON", flag_values=fv)
    if any(a in ("-h", "--help", "-help", "--helpshort", "--helpfull") for a in argv[1:]):
        print(f"usage: {os.path.basename(argv[0]) if argv else 'plan'} --config FILE[:ARG] [--config.x=y ...] "
              f"[flags]\n\n{__doc__.strip()}\n\nflags:")
        print(fv.get_help())
        print("\n`memagent plan --config FILE --print-config` lists the config's fields with defaults.")
        return 0
    try:
        rest = fv(argv)
    except (flags.Error, ValueError) as e:  # ValueError: a config's get_config refusing its argument (hardware)
        lines = [line for line in str(e).splitlines() if line.strip()]
        if any(line.startswith("Traceback") for line in lines):  # config_flags wraps the config's own error
            lines = [lines[0].rstrip(":"), lines[-1]]
        print("error: " + " ".join(lines), file=sys.stderr)
        return 2
    if len(rest) > 1:
        print(f"error: unexpected arguments {rest[1:]}", file=sys.stderr)
        return 2
    if fv["config"].value is None:
        print("error: --config is required, e.g. --config configs/qwen2_5_7b_hotpotqa.py:v5p-128", file=sys.stderr)
        return 2
    cfg = config_flag.value
    name = config_arg(argv) or "config"
    from memagent_jax.train import TrainConfigError, validate_config

    try:
        extra = int(cfg.mesh.get("rollout_devices", 0) or 0)
        devices = fv["devices"].value
        mesh = resolve_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices - extra if devices else None)
        validate_config(cfg, device_count=mesh.size + extra, check_files=False)
        plan = make_plan(cfg, hardware=fv["hardware"].value, devices=mesh.size + extra, mfu=fv["mfu"].value,
                         doc_tokens=fv["doc_tokens"].value, usable_fraction=fv["usable_fraction"].value, name=name)
    except (PlanError, TrainConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
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
