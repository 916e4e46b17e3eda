"""The plan: one training config (a configs/grpo.py-style ConfigDict) sized on one hardware, phase by phase, with a
verdict, warnings and, when it does not fit, the smallest overrides that make it fit."""

from __future__ import annotations

import dataclasses
from typing import Any

from memagent_jax.planning.errors import PlanError
from memagent_jax.planning.flops import decode_step_seconds, learning_flops, rollout_flops
from memagent_jax.planning.hardware import DTYPE_BYTES, GiB, Hardware, get_hardware, platform_of
from memagent_jax.planning.memory import (
    attention_path,
    decode_layout_of,
    gathered_param_bytes,
    kv_cache_bytes,
    layer_param_bytes_per_device,
    learner_activation_bytes,
    learner_batch_bytes,
    param_bytes_per_device,
    rollout_activation_bytes,
    working_weight_bytes,
)
from memagent_jax.planning.mesh import MeshShape, resolve_mesh
from memagent_jax.planning.shapes import Layout, param_count


@dataclasses.dataclass
class Plan:
    """Everything the planner computed for one config on one hardware (bytes per device, FLOPs per step)."""

    name: str
    model_name: str
    model: Any  # ModelConfig
    hardware: Hardware
    mesh: MeshShape
    layout: Layout
    settings: dict[str, Any]
    memory: dict[str, int]
    notes: dict[str, str]
    flops: dict[str, int]
    seconds: dict[str, float]
    usable_bytes: int
    fits: bool
    verdict: str
    warnings: list[str]
    rollout_mesh: MeshShape | None = None  # the rollout's mesh (the learner's unless config.mesh.rollout_devices)
    suggestions: list[str] = dataclasses.field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return self.memory["peak"]

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.name,
            "model": self.model_name,
            "params": param_count(self.model),
            "hardware": dataclasses.asdict(self.hardware),
            "devices": self.settings["devices"],
            "mesh": self.mesh.shape,
            "rollout_mesh": (self.rollout_mesh or self.mesh).shape,
            "layout": dataclasses.asdict(self.layout),
            "settings": self.settings,
            "memory_bytes": self.memory,
            "memory_gib": {k: round(v / GiB, 3) for k, v in self.memory.items()},
            "usable_bytes": self.usable_bytes,
            "usable_gib": round(self.usable_bytes / GiB, 3),
            "flops": self.flops,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "fits": self.fits,
            "verdict": self.verdict,
            "warnings": self.warnings,
            "suggestions": self.suggestions,
        }


def model_config_from(cfg):
    """(ModelConfig with the config's dtypes and remat, display name): `config.json` of config.model.path when
    that folder exists, else the preset config.model.preset."""
    import os

    from memagent_jax.models import presets
    from memagent_jax.models.config import ModelConfig

    m = cfg.model
    path = m.get("path", "") or ""
    preset = m.get("preset", "") or ""
    if path and os.path.isfile(os.path.join(path, "config.json")):
        mc, name = ModelConfig.from_hf_folder(path), path
    elif preset:
        try:
            mc, name = presets.preset_config(preset), preset
        except KeyError as e:
            raise PlanError(f"config.model.preset: {e.args[0]}") from None
    else:
        raise PlanError(
            "config.model.preset (a models.presets name) or config.model.path (a folder with "
            "config.json) is needed to size the model"
        )
    options = {}
    if "attention_impl" in m:
        options["attention_impl"] = m.attention_impl or "auto"
    if "attention_block_size" in m:
        options["attention_block_size"] = int(m.attention_block_size)
    if "decode_layout" in m:
        options["decode_layout"] = m.decode_layout or "auto"
    try:
        mc = mc.replace(param_dtype=m.param_dtype, compute_dtype=m.compute_dtype, remat=m.remat, **options)
    except ValueError as e:  # ConfigError: a bad attention_impl / block size
        raise PlanError(f"config.model: {e}") from None
    return mc, name


def layout_from(cfg, **templates) -> Layout:
    a = cfg.agent
    return Layout(
        question=a.question_tokens,
        memory=a.memory_tokens,
        chunk=a.chunk_tokens,
        answer=a.answer_tokens,
        chunks_per_segment=a.chunks_per_segment,
        **templates,
    )


def rollout_batch_size(cfg) -> int:
    """Trajectories per agent call: config.rl.rollout_batch_size when set (> 0), else the whole step."""
    total = cfg.rl.questions_per_step * cfg.rl.group_size
    size = int(cfg.rl.get("rollout_batch_size", 0) or 0)
    return min(size, total) if size > 0 else total


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def rollout_mesh_of(cfg, learner: MeshShape) -> tuple[MeshShape, int]:
    """(rollout mesh, its own device count): config.mesh.rollout_devices > 0 puts the rollout on that many more
    devices (data = rollout_devices / (rollout_fsdp x rollout_tensor)); 0 = the learner's mesh (count 0)."""
    n = int(cfg.mesh.get("rollout_devices", 0) or 0)
    if n <= 0:
        return learner, 0
    f, t = int(cfg.mesh.get("rollout_fsdp", 1) or 1), int(cfg.mesh.get("rollout_tensor", 1) or 1)
    if f < 1 or t < 1 or n % (f * t):
        raise PlanError(
            f"config.mesh.rollout_fsdp x config.mesh.rollout_tensor = {f} x {t} must divide "
            f"config.mesh.rollout_devices={n}"
        )
    return MeshShape(n // (f * t), f, t), n


def make_plan(
    cfg,
    *,
    hardware: str | Hardware | None = None,
    devices: int | None = None,
    mfu: float = 0.4,
    doc_tokens: int = 32000,
    usable_fraction: float = 0.9,
    name: str = "config",
    suggest: bool = True,
    **templates,
) -> Plan:
    """Sizes `cfg` (a configs/grpo.py-style ConfigDict) on `hardware` (default: config.hardware).

    devices: the run's device count, needed only when config.mesh has a -1 axis (it includes
    config.mesh.rollout_devices when the rollout has its own devices). `templates`: Layout template sizes.
    """
    hw = hardware if isinstance(hardware, Hardware) else get_hardware(hardware or cfg.get("hardware", "") or "")
    if not 0 < mfu <= 1:
        raise PlanError(f"--mfu must be in (0, 1], got {mfu}")
    if not 0 < usable_fraction <= 1:
        raise PlanError(f"--usable_fraction must be in (0, 1], got {usable_fraction}")
    if doc_tokens <= 0:
        raise PlanError(f"--doc_tokens must be positive, got {doc_tokens}")
    mc, model_name = model_config_from(cfg)
    extra = int(cfg.mesh.get("rollout_devices", 0) or 0)
    mesh = resolve_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices - extra if devices else None)
    rmesh, extra = rollout_mesh_of(cfg, mesh)
    separate = extra > 0
    layout = layout_from(cfg, **templates)
    rl = cfg.rl
    shards = mesh.batch_shards
    pdt, cdt = mc.param_dtype, mc.compute_dtype
    cb = DTYPE_BYTES[cdt]
    reference = rl.kl_coef > 0
    # With one update per step the loss reads its own log-probs as the old ones: no extra forward.
    recompute_old = bool(rl.recompute_old_logprobs) and int(rl.num_minibatches) > 1
    from memagent_jax.models.lora import lora_config, num_adapter_params

    lora = lora_config(cfg.get("lora"), error=PlanError)

    # Rollout: rows per agent call, padded to the rollout mesh's batch shards (agent.run pads with inactive rows).
    trajectories = rl.questions_per_step * rl.group_size
    per_call = rollout_batch_size(cfg)
    calls = -(-trajectories // per_call)
    call_rows = _round_up(per_call, rmesh.batch_shards)
    rollout_rows = call_rows // rmesh.batch_shards

    # Learner: one row per conversation, padded to rows_multiple = M x (micro-batch rows or batch shards).
    chunks = layout.chunks(doc_tokens)
    conversations = trajectories * (chunks + 1)
    m = rl.num_minibatches
    micro = rl.micro_batch_size or 0
    if micro and micro % shards:
        raise PlanError(
            f"config.rl.micro_batch_size={micro} must be a multiple of the mesh's batch shards (data x fsdp = {shards})"
        )
    n_rows = _round_up(conversations, m * (micro or shards))
    per_mb = n_rows // m
    length = layout.learn_length(int(rl.get("length_multiple", 64)))
    # Packed rows (rl.pack_length) hold several conversations each; in the worst case (every conversation at its
    # full budget) they hold one each, as many rows as unpacked, each pack_length long.
    length = max(length, int(rl.get("pack_length", 0)))
    platform = platform_of(hw)
    if not micro and platform == "cpu":  # the learner's CPU default (LearnerConfig.micro_batch_tokens)
        from memagent_jax.models.tiling import CPU_TILE_TOKENS, rows_per_tile

        micro = rows_per_tile(per_mb, length, CPU_TILE_TOKENS, shards)
    micro_rows = micro or per_mb
    k_micro = per_mb // micro_rows
    micro_per_device = micro_rows // shards
    if layout.update_slots > mc.max_position_embeddings or layout.final_slots > mc.max_position_embeddings:
        raise PlanError(
            f"config.agent budgets need a context of {max(layout.update_slots, layout.final_slots)} "
            f"tokens, more than the model's max_position_embeddings ({mc.max_position_embeddings})"
        )

    mem: dict[str, int] = {}
    notes: dict[str, str] = {}
    on_rollout = " (rollout devices)" if separate else ""
    p_bytes = param_bytes_per_device(mc, mesh, pdt)
    mem["params"] = p_bytes
    notes["params"] = f"{pdt}, over fsdp x tensor"
    mem["optimizer"] = 2 * p_bytes
    notes["optimizer"] = f"AdamW mu + nu in {pdt} (optax: the params' dtype)"
    mem["reference"] = p_bytes if reference else 0
    notes["reference"] = f"frozen copy for the KL (kl_coef {rl.kl_coef:g})" if reference else "kl_coef = 0"
    # LoRA: the trained tree is the adapters (f32, replicated); the base is frozen and is the KL reference; the
    # rollout samples with a merged copy of the weights (once per step), and the loss merges its own.
    a_bytes = 4 * num_adapter_params(mc, lora)
    mem["adapters"] = a_bytes
    notes["adapters"] = f"LoRA rank {lora.rank}, f32, replicated" if lora.enabled else "no LoRA"
    mem["merged_params"] = p_bytes if lora.enabled else 0
    notes["merged_params"] = "LoRA: the rollout's merged copy (W + alpha/r A.B)" if lora.enabled else "no LoRA"
    if lora.enabled:
        mem["optimizer"] = 2 * a_bytes
        notes["optimizer"] = "AdamW mu + nu of the adapters only (f32)"
        mem["reference"] = 0
        notes["reference"] = "none: the base params (adapters off) are the KL reference"
    mem["rollout_params"] = 2 * param_bytes_per_device(mc, rmesh, pdt) if separate else 0
    notes["rollout_params"] = (
        "copied from the learner every step (old + new copy)"
        if separate
        else "none: the rollout uses the learner's params"
    )
    mem["kv_update"] = kv_cache_bytes(mc, call_rows, layout.update_slots, rmesh, cdt)
    notes["kv_update"] = f"{rollout_rows} rows x {layout.update_slots} slots, {cdt}{on_rollout}"
    mem["kv_final"] = kv_cache_bytes(mc, call_rows, layout.final_slots, rmesh, cdt)
    notes["kv_final"] = f"{rollout_rows} rows x {layout.final_slots} slots, {cdt}{on_rollout}"
    decode_layout = decode_layout_of(mc, platform)
    if decode_layout == "unstacked":
        # While the rollout runs: per-layer copies of the layer weights (the agent's inference layout, held from
        # its first program to the end of the rollout), and while a decode loop runs a copy of the larger KV cache.
        mem["decode_copies"] = layer_param_bytes_per_device(mc, rmesh, pdt) + max(mem["kv_update"], mem["kv_final"])
        notes["decode_copies"] = f"decode_layout 'unstacked': per-layer weights ({pdt}) + a second KV cache"
    elif rmesh.batch_shards == 1:
        # A chunk step that only some rows reach gathers them into a batch of at most half the rows (row
        # compaction, on where rows are not sharded): their KV cache beside the whole one.
        mem["decode_copies"] = kv_cache_bytes(mc, -(-call_rows // 2), layout.update_slots, rmesh, cdt)
        notes["decode_copies"] = "decode_layout 'scan': weights, cache read in place; row compaction: half a KV cache"
    else:
        mem["decode_copies"] = 0
        notes["decode_copies"] = "decode_layout 'scan': reads the stacked weights and cache in place"
    learner_persistent = mem["params"] + mem["optimizer"] + mem["reference"] + mem["adapters"] + mem["merged_params"]
    rollout_persistent = mem["rollout_params"] + mem["kv_update"] + mem["kv_final"]
    mem["persistent"] = learner_persistent if separate else learner_persistent + rollout_persistent
    notes["persistent"] = "learner devices" if separate else ""

    weights_in_flight = working_weight_bytes(mc, rmesh.tensor, DTYPE_BYTES[pdt], cb)
    ro = rollout_activation_bytes(mc, rollout_rows, layout, rmesh.tensor, cb, platform=platform)
    mem["rollout_activations"] = ro["total"] + weights_in_flight + mem["decode_copies"]
    notes["rollout_activations"] = (
        f"{ro['program']}: {rollout_rows} rows x {ro['tokens']} tokens x "
        f"{ro['keys']} keys, {ro['path']} attention (scores {ro['scores'] / GiB:.1f} GiB)"
    )
    mem["rollout_peak"] = (rollout_persistent if separate else mem["persistent"]) + mem["rollout_activations"]
    notes["rollout_peak"] = on_rollout.strip(" ()")

    f32_tree = param_bytes_per_device(mc, mesh, "float32")
    mem["gradients"] = f32_tree + (p_bytes if pdt != "float32" else 0)
    notes["gradients"] = "f32" + (f" (+ the {pdt} gradient before the cast)" if pdt != "float32" else "")
    mem["grad_accumulator"] = f32_tree if k_micro > 1 else 0
    notes["grad_accumulator"] = f"f32, {k_micro} micro-batches" if k_micro > 1 else "no micro-batching"
    if lora.enabled:
        # The merge sits outside the layer scan: the merged weights' cotangent is whole-model sized for a moment,
        # then reduced to the adapters'; the accumulator holds adapter gradients only.
        mem["gradients"] = f32_tree + a_bytes
        notes["gradients"] = "LoRA: the merged weights' f32 cotangent (transient) + the adapters' gradient"
        mem["grad_accumulator"] = a_bytes if k_micro > 1 else 0
    mem["learner_batch"] = learner_batch_bytes(
        n_rows // shards, length, reference=reference, recompute_old=recompute_old
    )
    notes["learner_batch"] = f"{n_rows // shards} rows x {length} tokens"
    # The LM head runs on the response window (all positions of packed rows).
    head = length if int(rl.get("pack_length", 0)) else layout.head_positions(length)
    act = learner_activation_bytes(
        mc, micro_per_device, length, mc.remat, mesh.tensor, cb, platform=platform, head_positions=head
    )
    mem["learner_activations"] = act["total"] + working_weight_bytes(mc, mesh.tensor, DTYPE_BYTES[pdt], cb)
    notes["learner_activations"] = (
        f"remat {mc.remat}, {micro_per_device} rows x {length} tokens, "
        f"{attention_path(mc, platform, length, length)} attention, LM head on {head} positions per row"
    )
    mem["update_temporaries"] = p_bytes + 2 * p_bytes
    notes["update_temporaries"] = "new params + moments before the finite-check select"
    if lora.enabled:
        mem["learner_activations"] += p_bytes
        notes["learner_activations"] += f" + the loss's merged weights ({pdt})"
        mem["update_temporaries"] = 3 * a_bytes
        notes["update_temporaries"] = "new adapters + moments before the finite-check select"
    mem["learner_peak"] = (
        mem["persistent"]
        + mem["gradients"]
        + mem["grad_accumulator"]
        + mem["learner_batch"]
        + max(mem["learner_activations"], mem["update_temporaries"])
    )
    notes["learner_peak"] = "learner devices" if separate else ""
    mem["peak"] = max(mem["rollout_peak"], mem["learner_peak"])

    # FLOPs and time (rollout on the rollout mesh, learning on the learner's; one after the other, as train.py).
    rf = rollout_flops(mc, calls * call_rows, layout, doc_tokens)
    lf = learning_flops(
        mc,
        n_rows * length,
        length,
        remat=mc.remat,
        reference=reference,
        recompute_old=recompute_old,
        head_positions=head,
    )
    seconds: dict[str, float] = {}
    seconds["rollout_prefill"] = rf["prefill"] / (rmesh.size * hw.peak_flops * mfu)
    t_mem, read_mem = decode_step_seconds(mc, rollout_rows, layout.update_slots, rmesh, hw, pdt, cdt)
    t_ans, read_ans = decode_step_seconds(mc, rollout_rows, layout.final_slots, rmesh, hw, pdt, cdt)
    decode_steps = chunks * layout.memory + layout.answer
    seconds["rollout_decode"] = calls * (chunks * layout.memory * t_mem + layout.answer * t_ans)
    seconds["learning"] = lf["total"] / (mesh.size * hw.peak_flops * mfu)
    seconds["step"] = seconds["rollout_prefill"] + seconds["rollout_decode"] + seconds["learning"]
    flops = {
        "rollout_prefill": rf["prefill"],
        "rollout_decode": rf["decode"],
        "learning": lf["total"],
        "learning_train": lf["train"],
        "learning_remat": lf["remat"],
        "learning_reference": lf["reference"],
        "learning_old_logprobs": lf["old_logprobs"],
    }
    flops["total"] = flops["rollout_prefill"] + flops["rollout_decode"] + flops["learning"]

    usable = int(hw.hbm_bytes * usable_fraction)
    fits = mem["peak"] <= usable
    settings = {
        "devices": mesh.size + extra,
        "rollout_devices": extra,
        "rollout_mesh": rmesh.shape,
        "trajectories": trajectories,
        "rollout_batch_size": per_call,
        "rollout_calls": calls,
        "rollout_rows_per_device": rollout_rows,
        "chunks": chunks,
        "doc_tokens": doc_tokens,
        "conversations": conversations,
        "learner_rows": n_rows,
        "learn_length": length,
        "minibatches": m,
        "micro_batches": k_micro,
        "micro_batch_rows": micro_rows,
        "micro_rows_per_device": micro_per_device,
        "decode_steps_per_call": decode_steps,
        "decode_bytes_per_step": read_mem,
        "decode_bytes_per_answer_step": read_ans,
        "fsdp_gather_bytes_per_decode_step": (
            gathered_param_bytes(mc, rmesh, pdt) - param_bytes_per_device(mc, rmesh, pdt) if rmesh.fsdp > 1 else 0
        ),
        "mfu": mfu,
        "remat": mc.remat,
        "param_dtype": pdt,
        "compute_dtype": cdt,
        "attention_impl": mc.attention_impl,
        "rollout_attention": ro["path"],
        "decode_layout": decode_layout,
        "learner_attention": attention_path(mc, platform, length, length),
    }
    warnings = _warnings(cfg, mc, per_call, trajectories, mesh.size + extra, hw, calls, templates)
    if fits:
        verdict = f"fits: peak {mem['peak'] / GiB:.1f} GiB of {usable / GiB:.1f} GiB usable per device"
    else:
        if mem["rollout_peak"] >= mem["learner_peak"]:
            what = (
                f"the rollout ({notes['rollout_activations']}; KV caches "
                f"{(mem['kv_update'] + mem['kv_final']) / GiB:.1f} GiB)"
            )
            peak = mem["rollout_peak"]
        else:
            what = (
                f"the learner step (activations {mem['learner_activations'] / GiB:.1f} GiB: "
                f"{notes['learner_activations']})"
            )
            peak = mem["learner_peak"]
        verdict = f"DOES NOT FIT: {what} needs {peak / GiB:.1f} GiB of {usable / GiB:.1f} GiB per device"
    plan = Plan(
        name=name,
        model_name=model_name,
        model=mc,
        hardware=hw,
        mesh=mesh,
        layout=layout,
        settings=settings,
        memory=mem,
        notes=notes,
        flops=flops,
        seconds=seconds,
        usable_bytes=usable,
        fits=fits,
        verdict=verdict,
        warnings=warnings,
        rollout_mesh=rmesh,
    )
    if not fits and suggest:
        plan.suggestions = suggest_fixes(
            cfg,
            hw,
            mesh,
            devices=mesh.size + extra,
            mfu=mfu,
            doc_tokens=doc_tokens,
            usable_fraction=usable_fraction,
            **templates,
        )
        if plan.suggestions:
            plan.verdict += ", try " + plan.suggestions[0]
        else:
            plan.verdict += ", try more devices (a larger slice or more nodes) or smaller budgets"
    return plan


def _warnings(cfg, mc, per_call, trajectories, devices, hw, calls, templates) -> list[str]:
    out = []
    lr = cfg.rl.learning_rate
    if mc.param_dtype != "float32" and lr < 6e-5:
        out.append(
            f"param_dtype {mc.param_dtype} with learning_rate {lr:g}: AdamW moves a weight by about the "
            f"learning rate per update, but a {mc.param_dtype} weight of size 0.02 only changes by steps of "
            f">= 6e-5 (half an ulp), so most updates round away: use --config.model.param_dtype=float32 "
            f"(master weights) with compute_dtype bfloat16"
        )
    if per_call < trajectories and trajectories % per_call:
        out.append(
            f"config.rl.rollout_batch_size={per_call} does not divide the {trajectories} trajectories of a "
            f"step: the last agent call has another batch size (a second compile and a second pair of KV "
            f"caches, not counted here)"
        )
    tensors = {
        int(cfg.mesh.tensor),
        int(cfg.mesh.get("rollout_tensor", 1) or 1)
        if int(cfg.mesh.get("rollout_devices", 0) or 0)
        else int(cfg.mesh.tensor),
    }
    for t in sorted(tensors):
        if t > 1 and mc.num_kv_heads % t:
            out.append(
                f"tensor={t} does not divide the {mc.num_kv_heads} KV heads: KV caches and attention are "
                f"replicated over 'tensor' (this plan assumes so)"
            )
    return out


def _with(cfg, **changes):
    """A copy of cfg with dotted fields changed ('rl.micro_batch_size': 16)."""
    new = cfg.copy_and_resolve_references()
    with new.unlocked():
        for key, value in changes.items():
            node = new
            parts = key.split(".")
            for p in parts[:-1]:
                node = node[p]
            node[parts[-1]] = value
    return new


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def suggest_fixes(cfg, hw: Hardware, mesh: MeshShape, *, devices: int, **kwargs) -> list[str]:
    """Override sets (command-line flags) that make the plan fit on the same devices, the smallest change first:
    remat 'full' (and attention_impl 'auto' when it is 'materialized'); then also one row per device per micro-batch;
    then also the largest rollout_batch_size (a power of two no larger than now) that fits; then the same on meshes
    with other tensor sizes (the learner's mesh)."""
    trajectories = cfg.rl.questions_per_step * cfg.rl.group_size
    current = rollout_batch_size(cfg)
    base: dict[str, Any] = {} if cfg.model.remat == "full" else {"model.remat": "full"}
    if (cfg.model.get("attention_impl") or "auto") == "materialized":
        base["model.attention_impl"] = "auto"  # no [T, S] scores (blockwise / cuDNN)
    meshes = [(mesh.data, mesh.fsdp, mesh.tensor)] + [
        (1, mesh.size // t, t) for t in _divisors(mesh.size) if t != mesh.tensor and t <= 16
    ]
    candidates: list[dict[str, Any]] = []
    if base:
        candidates.append(dict(base))
    for data, fsdp, tensor in meshes:
        shards = data * fsdp
        change = dict(base)
        if (data, fsdp, tensor) != (mesh.data, mesh.fsdp, mesh.tensor):
            change.update({"mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor})
        change["rl.micro_batch_size"] = shards
        candidates.append(dict(change))
        size = 1 << (current.bit_length() - 1)  # the largest power of two <= the current rollout batch
        while size >= 1:
            if trajectories % size == 0:
                candidates.append({**change, "rl.rollout_batch_size": size})
            size //= 2
    for change in candidates:
        try:
            p = make_plan(_with(cfg, **change), hardware=hw, devices=devices, suggest=False, **kwargs)
        except PlanError:
            continue
        if p.fits:
            flags = " ".join(f"--config.{k}={v}" for k, v in change.items() if _differs(cfg, k, v))
            return [flags] if flags else []
    return []


def _differs(cfg, key: str, value) -> bool:
    node = cfg
    for p in key.split("."):
        if p not in node:
            return True
        node = node[p]
    return node != value
