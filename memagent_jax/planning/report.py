"""The plan as text: the table `python -m memagent_jax.plan` prints (memory per device phase by phase, FLOPs and
time per step, warnings, the verdict)."""

from __future__ import annotations

from memagent_jax.planning.hardware import GiB
from memagent_jax.planning.plan import Plan
from memagent_jax.planning.shapes import param_count


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
    lines.append(
        f"  model     {plan.model_name}: {param_count(mc) / 1e9:.2f} B params (L {mc.num_layers}, "
        f"D {mc.hidden_size}, H {mc.num_heads} / KV {mc.num_kv_heads} x {mc.head_dim}, "
        f"F {mc.intermediate_size}, V {mc.vocab_size}); params {mc.param_dtype}, compute "
        f"{mc.compute_dtype}, remat {mc.remat}, attention {mc.attention_impl} (rollout "
        f"{st['rollout_attention']}, learner {st['learner_attention']})"
    )
    lines.append(
        f"  hardware  {st['devices']} x {hw.name} ({hw.description}): {hw.hbm_bytes / GiB:.1f} GiB HBM, "
        f"{hw.peak_flops / 1e12:.0f} TFLOP/s bf16, {hw.hbm_bandwidth / 1e9:.0f} GB/s each"
    )
    lines.append(f"  mesh      {plan.mesh} (rows over {plan.mesh.batch_shards} batch shards)")
    if st["rollout_devices"]:
        lines.append(f"  rollout   on its own {st['rollout_devices']} devices: {plan.rollout_mesh}")
    lay = plan.layout
    lines.append(
        f"  step      {st['trajectories']} trajectories x ({st['chunks']} chunks + final) of a "
        f"{st['doc_tokens']}-token document = {st['conversations']} conversations"
    )
    lines.append(
        f"  layout    update prompt {lay.prefix} + {lay.rest} tokens, {lay.update_slots} cache slots; final "
        f"prompt {lay.final_prompt}, {lay.final_slots} slots; learner rows of {st['learn_length']} tokens"
    )
    lines.append(
        f"  rollout   {st['rollout_calls']} agent call(s) of {st['rollout_batch_size']} trajectories "
        f"({st['rollout_rows_per_device']} rows per device)"
    )
    lines.append(
        f"  learner   {st['learner_rows']} rows = {st['minibatches']} mini-batches x {st['micro_batches']} "
        f"micro-batches x {st['micro_batch_rows']} rows ({st['micro_rows_per_device']} per device)"
    )
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
    rows += [
        ("rollout_peak", "= rollout peak"),
        ("gradients", "+ gradients"),
        ("grad_accumulator", "+ grad accumulator"),
        ("learner_batch", "+ learner batch"),
        ("learner_activations", "+ max(activations"),
        ("update_temporaries", "        update temps)"),
        ("learner_peak", "= learner peak"),
    ]
    for key, label in rows:
        lines.append(f"  {label:28s} {_gib(mem[key])}   {notes.get(key, '')}")
    lines.append(
        f"  {'PEAK':28s} {_gib(mem['peak'])}   of {plan.usable_bytes / GiB:.1f} GiB usable "
        f"({hw.hbm_bytes / GiB:.1f} GiB HBM)"
    )
    lines.append("")
    lines.append("  compute per step                FLOPs        time")
    s, f = plan.seconds, plan.flops
    lines.append(
        f"  rollout prefill        {_si(f['rollout_prefill'], 'FLOP'):>16s}   "
        f"{_duration(s['rollout_prefill']):>9s}   at MFU {st['mfu']:.2f}"
    )
    lines.append(
        f"  rollout decode         {_si(f['rollout_decode'], 'FLOP'):>16s}   "
        f"{_duration(s['rollout_decode']):>9s}   {st['rollout_calls']} x {st['decode_steps_per_call']} steps, "
        f"{st['decode_bytes_per_step'] / 1e9:.2f} GB read per step per device (HBM-bound)"
    )
    lines.append(
        f"  learning               {_si(f['learning'], 'FLOP'):>16s}   {_duration(s['learning']):>9s}"
        f"   train {_si(f['learning_train'], 'FLOP')}, remat {_si(f['learning_remat'], 'FLOP')}, "
        f"reference {_si(f['learning_reference'], 'FLOP')}, old log-probs "
        f"{_si(f['learning_old_logprobs'], 'FLOP')}"
    )
    lines.append(f"  step                   {_si(f['total'], 'FLOP'):>16s}   {_duration(s['step']):>9s}")
    if st["fsdp_gather_bytes_per_decode_step"]:
        lines.append(
            f"  (not timed: FSDP all-gathers {st['fsdp_gather_bytes_per_decode_step'] / 1e9:.2f} GB of "
            f"weights into each device per decode step and per forward)"
        )
    for w in plan.warnings:
        lines.append(f"  WARNING: {w}")
    lines.append("")
    lines.append(f"verdict: {plan.verdict}")
    return "\n".join(lines)
