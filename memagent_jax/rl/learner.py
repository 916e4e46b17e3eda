"""The learner: train state, optimiser, and one jitted train step per rollout (GRPO or supervised warm start).

One `train_step` call consumes one rollout's `ConversationBatch` of N rows and makes `num_minibatches` optimiser
updates from it (one epoch), all inside ONE jit:

    batch [N, T]  --(row layout below)-->  [M mini-batches, K micro-batches, mb rows, T]
      (optional) old log-probs recomputed with the params as they were before the first update   (no grad)
      (optional) reference log-probs computed with the frozen reference params (if kl_coef > 0)  (no grad)
      lr = schedule(state.step)
      lax.scan over the M mini-batches:
          lax.scan over the K micro-batches: grads += d/dparams [ sum of per-token losses / D ]
              (D = the whole mini-batch's response-token count, or its row count for seq-mean, so the sum
               over micro-batches IS the mini-batch loss and gradient, not an average of averages)
          non-finite loss or gradient?  -> skip: params and optimiser state keep their values
          else                          -> AdamW update (global-norm clip first)
      step += 1

Mini-batches are a scan inside the jit (not a host loop): one dispatch per rollout, the schedule and the state
step advance once per rollout (as in the reference recipe, where "20 warm-up steps" are 20 training steps), and the
old / reference log-prob passes sit in the same program.

Row layout: with M mini-batches of K micro-batches of `mb` rows (N = M * K * mb), row n goes to mini-batch
n % M, micro-batch (n // M) % K, slot n // (M * K). Every contiguous block of rows (what one device holds under
batch sharding) thus feeds every mini-batch, and the split needs no communication. Rows within a rollout are
ordered by trajectory, so shuffle them first (`batch.shuffle_rows`) to get random mini-batches.

Skips: `TrainState.step` counts train steps (rollouts) and always advances; `TrainState.skipped_updates` counts the
mini-batch updates skipped because their loss or gradient was not finite. Per-step metrics report
`nonfinite_updates`. With `on_nonfinite='raise'` the host wrapper raises `NonFiniteError` after the step (the
returned state never includes a bad update).

Learning-rate schedule, in train steps s = state.step (0-based), with W = warmup_steps: linear warm-up for s < W,
then constant lr, or cosine from lr down to lr * min_lr_ratio at s = total_steps. The warm-up is
lr * (s + 1) / W by default (the first step already learns, at lr / W), or lr * s / W with
`warmup_from_zero=True` (the reference recipe's scheduler: step 0 runs at lr 0, so Adam's moments see the first
gradient but the params do not move; full lr from step W on in both variants).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from memagent_jax import settings
from memagent_jax.distributed import arrays as multiprocess
from memagent_jax.models import lora as lora_lib
from memagent_jax.models import sharding as sharding_lib
from memagent_jax.models import tiling
from memagent_jax.models.config import ModelConfig
from memagent_jax.models.transformer import abstract_params as model_abstract_params
from memagent_jax.rl.batch import BatchError, ConversationBatch, head_window, segment_positions
from memagent_jax.rl.logprobs import token_logprobs
from memagent_jax.rl.losses import LossConfig, compute_loss, metric_identity, reduce_metric

__all__ = [
    "OptimizerConfig",
    "LearnerConfig",
    "LearnerConfigError",
    "NonFiniteError",
    "TrainState",
    "Learner",
    "make_optimizer",
    "learning_rate_schedule",
    "set_learning_rate",
    "init_train_state",
    "minibatch_rows",
    "accumulate_gradients",
    "response_window_for",
    "train_step_fn",
]

NONFINITE_MODES = ("skip", "raise")
SCHEDULES = ("constant", "cosine")


class LearnerConfigError(settings.SettingError):
    """A learner / optimiser setting is invalid; the message names the field."""


class NonFiniteError(FloatingPointError):
    """A train step met a non-finite loss or gradient and `learner.on_nonfinite` is 'raise'."""


def _check_number(owner: str, name: str, value, *, minimum=None, strict=False, maximum=None, allow_none=False):
    settings.real(
        f"{owner}.{name}",
        value,
        low=minimum,
        low_open=strict,
        high=maximum,
        none_ok=allow_none,
        error=LearnerConfigError,
    )


def _check_int(owner: str, name: str, value, *, minimum: int, allow_none=False):
    settings.integer(f"{owner}.{name}", value, minimum=minimum, none_ok=allow_none, error=LearnerConfigError)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with warm-up then a constant or cosine schedule, and global-norm gradient clipping.

    learning_rate: peak learning rate.   b1, b2, eps: Adam moments.   weight_decay: decoupled (AdamW), all params.
    max_grad_norm: clip the gradient's global norm to this (None: no clipping).
    warmup_steps: linear warm-up length in train steps (0: none).
    warmup_from_zero: warm up as lr * s / warmup_steps (step 0 at lr 0, the reference recipe's scheduler) instead
      of lr * (s + 1) / warmup_steps.
    schedule: 'constant' or 'cosine' after the warm-up.
    total_steps: train steps at which the cosine reaches its floor (required for 'cosine').
    min_lr_ratio: the cosine floor as a fraction of learning_rate.
    """

    learning_rate: float = 1e-6
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    warmup_steps: int = 20
    warmup_from_zero: bool = False
    schedule: str = "constant"
    total_steps: int | None = None
    min_lr_ratio: float = 0.0

    def __post_init__(self):
        o = "optimizer"
        _check_number(o, "learning_rate", self.learning_rate, minimum=0)
        _check_number(o, "b1", self.b1, minimum=0, maximum=1)
        _check_number(o, "b2", self.b2, minimum=0, maximum=1)
        for name in ("b1", "b2"):
            if getattr(self, name) >= 1:
                raise LearnerConfigError.at(f"{o}.{name}", f"must be < 1, got {getattr(self, name)}")
        _check_number(o, "eps", self.eps, minimum=0, strict=True)
        _check_number(o, "weight_decay", self.weight_decay, minimum=0)
        _check_number(o, "max_grad_norm", self.max_grad_norm, minimum=0, strict=True, allow_none=True)
        _check_int(o, "warmup_steps", self.warmup_steps, minimum=0)
        settings.boolean(f"{o}.warmup_from_zero", self.warmup_from_zero, error=LearnerConfigError)
        settings.choice(f"{o}.schedule", self.schedule, SCHEDULES, error=LearnerConfigError)
        _check_int(o, "total_steps", self.total_steps, minimum=1, allow_none=True)
        if self.schedule == "cosine":
            if self.total_steps is None:
                raise LearnerConfigError.at(f"{o}.total_steps", "is required for the cosine schedule")
            if self.total_steps <= self.warmup_steps:
                raise LearnerConfigError.at(
                    f"{o}.total_steps",
                    f"({self.total_steps}) must exceed {o}.warmup_steps ({self.warmup_steps}) for the cosine schedule",
                )
        _check_number(o, "min_lr_ratio", self.min_lr_ratio, minimum=0, maximum=1)

    def replace(self, **changes) -> OptimizerConfig:
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class LearnerConfig:
    """Learner settings (hashable: static under jit).

    loss: `LossConfig` (GRPO or SFT).   optimizer: `OptimizerConfig`.
    num_minibatches: optimiser updates per train step (the rollout batch is split into this many; one epoch).
    micro_batch_size: rows per micro-batch for gradient accumulation (None: sized by `micro_batch_tokens`).
    micro_batch_tokens: with micro_batch_size None, micro-batches of the most rows that hold at most this many
      tokens (rows x T; a divisor of the mini-batch's rows, a multiple of the mesh's batch shards). None: on CPU
      `models.tiling.CPU_TILE_TOKENS` (a few thousand tokens keep a layer's activations in the caches: a GRPO step of
      1152 rows x 112 tokens of the main job's model ran 1.56x faster than as one micro-batch), elsewhere the
      whole mini-batch; 0: the whole mini-batch. The sum over micro-batches is the mini-batch's gradient either way.
    recompute_old_logprobs: recompute the old log-probs with the current params before the first update
      (instead of trusting the sampler's). With one update per step (num_minibatches 1) the params of that update
      are the ones the old log-probs would come from, so no extra pass runs: the loss takes its own log-probs,
      gradient stopped, as the old ones (ratio 1, the same gradient; one forward pass less per step).
    on_nonfinite: 'skip' (skip that update, count it) or 'raise' (`NonFiniteError` after the step).
    logits_chunk_size: sequence positions per logits chunk in the log-prob computation (0: no chunking).
    compute_entropy: compute the policy entropy for the metrics (always on when loss.entropy_coef > 0).
    remat: overrides the model config's layer-scan remat ('none' | 'full' | 'dots'); None keeps it.
    lora: `LoraConfig`; with rank > 0 the train state holds only the adapters (and their optimiser state), the
      base params stay frozen in the `Learner` and serve as the KL reference (see `Learner.init_state`).
    response_window: positions per row on which the LM head runs (`token_logprobs`' response window): None picks
      it per batch (the longest response rounded up to a power of two, at least 16; every position for packed
      rows or when that reaches T); 0 runs the head on every position; W > 0 fixes it (a longer response is an
      error naming the row). The loss only reads response tokens, so the result is the same.
    logprob_temperature: T > 0, the rollout's sampling temperature: the policy's log-probs (new, recomputed old,
      reference) and its entropy are those of softmax(logits / T), as verl computes them (top-k / top-p not
      applied); the sampler's old log-probs must be the same (`SamplingParams.tempered_logprobs`). 1: the logits
      as they are.
    """

    loss: LossConfig = LossConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    num_minibatches: int = 1
    micro_batch_size: int | None = None
    micro_batch_tokens: int | None = None
    recompute_old_logprobs: bool = False
    on_nonfinite: str = "skip"
    logits_chunk_size: int = 512
    compute_entropy: bool = True
    remat: str | None = None
    lora: lora_lib.LoraConfig = lora_lib.LoraConfig()
    logprob_temperature: float = 1.0
    response_window: int | None = None

    def __post_init__(self):
        o = "learner"
        if not isinstance(self.lora, lora_lib.LoraConfig):
            raise LearnerConfigError(f"{o}.lora must be a LoraConfig, got {type(self.lora).__name__}")
        if not isinstance(self.loss, LossConfig):
            raise LearnerConfigError(f"{o}.loss must be a LossConfig, got {type(self.loss).__name__}")
        if not isinstance(self.optimizer, OptimizerConfig):
            raise LearnerConfigError(f"{o}.optimizer must be an OptimizerConfig, got {type(self.optimizer).__name__}")
        _check_int(o, "num_minibatches", self.num_minibatches, minimum=1)
        _check_int(o, "micro_batch_size", self.micro_batch_size, minimum=1, allow_none=True)
        _check_int(o, "micro_batch_tokens", self.micro_batch_tokens, minimum=0, allow_none=True)
        settings.choice(f"{o}.on_nonfinite", self.on_nonfinite, NONFINITE_MODES, error=LearnerConfigError)
        _check_int(o, "logits_chunk_size", self.logits_chunk_size, minimum=0)
        _check_number(o, "logprob_temperature", self.logprob_temperature, minimum=0, strict=True)
        _check_int(o, "response_window", self.response_window, minimum=0, allow_none=True)
        if self.remat is not None:
            settings.choice(f"{o}.remat", self.remat, ("none", "full", "dots"), error=LearnerConfigError)

    @property
    def need_entropy(self) -> bool:
        return self.compute_entropy or (self.loss.kind == "grpo" and self.loss.entropy_coef > 0)

    def split(self, num_rows: int) -> tuple[int, int, int]:
        """(M mini-batches, K micro-batches per mini-batch, rows per micro-batch) for a batch of `num_rows`."""
        m = self.num_minibatches
        if num_rows % m:
            raise BatchError(f"batch has {num_rows} rows, not a multiple of learner.num_minibatches={m}")
        per_mb = num_rows // m
        micro = self.micro_batch_size or per_mb
        if per_mb % micro:
            raise BatchError(
                f"mini-batches of {per_mb} rows ({num_rows} rows / {m}) are not a multiple of "
                f"learner.micro_batch_size={micro}"
            )
        return m, per_mb // micro, micro

    def replace(self, **changes) -> LearnerConfig:
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------- optimiser


def learning_rate_schedule(config: OptimizerConfig) -> Callable[[jax.Array], jax.Array]:
    """step (int, 0-based train step) -> learning rate (f32); see the module docstring."""
    lr, warm = float(config.learning_rate), int(config.warmup_steps)

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        value = jnp.full_like(s, lr)
        if config.schedule == "cosine":
            span = float(config.total_steps - warm)
            progress = jnp.clip((s - warm) / span, 0.0, 1.0)
            floor = config.min_lr_ratio
            value = lr * (floor + (1.0 - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
        if warm > 0:
            start = 0.0 if config.warmup_from_zero else 1.0
            value = jnp.where(s < warm, lr * (s + start) / warm, value)
        return value

    return schedule


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """optax chain: global-norm clip, then AdamW whose learning rate lives in the state (`set_learning_rate`).

    Dtypes: gradients reach the optimiser in f32 (`_accumulate` casts them); the AdamW moments (mu, nu) are held
    in the params' dtype (optax's default), so with `param_dtype='bfloat16'` the moments and the update are bf16
    too. The recommended mixed-precision setting is `param_dtype='float32'` (f32 master weights and moments)
    with `compute_dtype='bfloat16'` (bf16 matmuls, KV cache and activations; loss, log-probs and logits f32).
    """
    clip = optax.clip_by_global_norm(config.max_grad_norm) if config.max_grad_norm else optax.identity()
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("b1", "b2", "eps", "weight_decay"))(
        learning_rate=config.learning_rate, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay
    )
    return optax.chain(clip, adamw)


def set_learning_rate(opt_state, learning_rate):
    """The optimiser state of `make_optimizer` with its AdamW learning rate replaced (traceable)."""
    clip_state, adam_state = opt_state
    hyper = dict(adam_state.hyperparams)
    hyper["learning_rate"] = jnp.asarray(learning_rate, hyper["learning_rate"].dtype)
    return (clip_state, adam_state._replace(hyperparams=hyper))


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["params", "opt_state", "step", "skipped_updates"], meta_fields=[]
)
@dataclasses.dataclass
class TrainState:
    """params: model params; opt_state: optax state; step: [] int32 train steps done (= rollouts learned from);
    skipped_updates: [] int32 mini-batch updates skipped for a non-finite loss or gradient (running total)."""

    params: Any
    opt_state: Any
    step: Any
    skipped_updates: Any

    def replace(self, **changes) -> TrainState:
        return dataclasses.replace(self, **changes)


def init_train_state(params, optimizer: optax.GradientTransformation) -> TrainState:
    """A fresh state (traceable; `Learner.init_state` places it on the mesh)."""
    return TrainState(
        params=params,
        opt_state=optimizer.init(params),
        step=jnp.zeros((), jnp.int32),
        skipped_updates=jnp.zeros((), jnp.int32),
    )


# -------------------------------------------------------------------------------------- row layout


def minibatch_rows(num_rows: int, num_minibatches: int, num_micro: int) -> np.ndarray:
    """[M, K, mb] row indices: which batch rows form micro-batch k of mini-batch m (see the module docstring)."""
    m, k = num_minibatches, num_micro
    mb = num_rows // (m * k)
    return np.arange(num_rows).reshape(mb, k, m).transpose(2, 1, 0)


def _split_rows(x, m: int, k: int, constrain=None):
    """[N, ...] -> [M, K, mb, ...] following `minibatch_rows` (a reshape + transpose: no data movement when rows
    are sharded in contiguous blocks)."""
    mb = x.shape[0] // (m * k)
    y = x.reshape((mb, k, m) + x.shape[1:])
    y = jnp.moveaxis(y, (0, 1, 2), (2, 1, 0))
    return constrain(y, 2) if constrain is not None else y


# ------------------------------------------------------------------------------------ loss + grads


def _row_layout(segment_ids, loss_mask=None, window: int = 0):
    """token_logprobs' keyword arguments for one-conversation rows (None; with `window` > 0 the head runs on the
    `window` positions from each row's first response token) or packed rows (segment ids)."""
    if segment_ids is None:
        if window and loss_mask is not None:
            return dict(response_start=jnp.argmax(loss_mask, axis=-1), response_window=window)
        return {}
    return dict(positions=segment_positions(segment_ids), segment_ids=segment_ids)


def response_window_for(batch: ConversationBatch, config: LearnerConfig, mesh: Mesh | None = None) -> int:
    """The static head window a train step on `batch` uses (0: every position); see `LearnerConfig.response_window`.
    Host-side: reads the batch's loss mask. Raises BatchError if a fixed window is shorter than a response."""
    if batch.packed or config.response_window == 0:
        return 0
    loss_mask = np.asarray(batch.loss_mask)
    t = loss_mask.shape[1]
    has = loss_mask.any(axis=1)
    first = np.argmax(loss_mask, axis=1)
    last = t - 1 - np.argmax(loss_mask[:, ::-1], axis=1)
    spans = np.where(has, last - first + 1, 0)
    longest = int(spans.max()) if spans.size else 0
    if config.response_window is not None:
        if longest > config.response_window:
            row = int(np.argmax(spans))
            raise BatchError(
                f"loss_mask row {row}: a response of {longest} positions does not fit learner.response_window="
                f"{config.response_window} (raise it, or None to size it per batch)"
            )
        window = config.response_window
    else:
        window = head_window(longest)
        if multiprocess.is_multiprocess(mesh):
            window = multiprocess.process_max(window)
    return window if window < t else 0


def _micro_loss(
    params,
    micro: ConversationBatch,
    token_den,
    seq_den,
    *,
    model_config: ModelConfig,
    config: LearnerConfig,
    window: int = 0,
    on_policy: bool = False,
):
    """on_policy: the params are the behaviour policy's (one update per step): the old log-probs are `logp`
    itself, gradient stopped, and `micro.old_logprobs` is not read."""
    logp, ent = token_logprobs(
        params,
        micro.tokens,
        micro.token_mask,
        config=model_config,
        chunk_size=config.logits_chunk_size,
        with_entropy=config.need_entropy,
        temperature=config.logprob_temperature,
        **_row_layout(micro.segment_ids, micro.loss_mask, window),
    )
    return compute_loss(
        config.loss,
        logp,
        micro.loss_mask,
        old_logprobs=jax.lax.stop_gradient(logp) if on_policy else micro.old_logprobs,
        advantages=micro.advantages,
        ref_logprobs=micro.ref_logprobs,
        entropy=ent if config.need_entropy else None,
        token_denominator=token_den,
        seq_denominator=seq_den,
    )


def _denominators(loss_mask):
    """Response tokens and rows with any response token, over everything given (at least 1 each)."""
    tok = jnp.maximum(jnp.sum(loss_mask.astype(jnp.float32)), 1.0)
    seq = jnp.maximum(jnp.sum(jnp.any(loss_mask, axis=-1).astype(jnp.float32)), 1.0)
    return tok, seq


def _accumulate(
    params,
    micro_batches: ConversationBatch,
    *,
    model_config,
    config,
    constrain_micro=None,
    constrain_grads=None,
    base_params=None,
    window: int = 0,
    on_policy: bool = False,
):
    """micro_batches: [K, mb, T] leaves (one mini-batch). Returns (grads f32 tree, metrics dict).

    base_params (LoRA): `params` are the adapters; the loss runs on the merged weights, the gradient is the
    adapters'. on_policy: see `_micro_loss`."""
    token_den, seq_den = _denominators(micro_batches.loss_mask)
    loss = functools.partial(_micro_loss, model_config=model_config, config=config, window=window, on_policy=on_policy)
    if base_params is not None:
        plain_loss = loss

        def loss(adapters, *args):
            return plain_loss(lora_lib.merge(base_params, adapters, config.lora), *args)

    grad_fn = jax.value_and_grad(loss, has_aux=True)

    def one(micro):
        if constrain_micro is not None:
            micro = jax.tree.map(lambda a: constrain_micro(a, 0), micro)
        (_, metrics), grads = grad_fn(params, micro, token_den, seq_den)
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        return grads, metrics

    k = micro_batches.tokens.shape[0]
    if k == 1:
        grads, metrics = one(jax.tree.map(lambda a: a[0], micro_batches))
    else:
        _, metric_shapes = jax.eval_shape(one, jax.tree.map(lambda a: a[0], micro_batches))
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        if constrain_grads is not None:
            zeros = constrain_grads(zeros)
        init = (zeros, {name: metric_identity(name, jnp.zeros(s.shape, s.dtype)) for name, s in metric_shapes.items()})

        def body(carry, micro):
            g_acc, m_acc = carry
            grads, metrics = one(micro)
            g_acc = jax.tree.map(jnp.add, g_acc, grads)
            if constrain_grads is not None:
                g_acc = constrain_grads(g_acc)
            m_acc = {name: reduce_metric(name, m_acc[name], metrics[name]) for name in m_acc}
            return (g_acc, m_acc), None

        (grads, metrics), _ = jax.lax.scan(body, init, micro_batches)
    return grads, metrics


def _fill_reference(batch: ConversationBatch, ref_params, *, config: LearnerConfig):
    if config.loss.uses_reference and batch.ref_logprobs is None and ref_params is None:
        raise LearnerConfigError(
            "loss.kl_coef > 0 needs reference log-probs: pass ref_params to the train step "
            "or ref_logprobs in the batch (or set loss.kl_coef = 0)"
        )


def accumulate_gradients(
    params,
    batch: ConversationBatch,
    *,
    model_config: ModelConfig,
    config: LearnerConfig,
    micro_batch_size: int | None = None,
    base_params=None,
    window: int = 0,
):
    """Gradient and metrics of ONE mini-batch's loss, accumulated over micro-batches (public for tests/tools).

    batch: [mb, T] (its old_logprobs, and ref_logprobs if kl_coef > 0, filled in). Micro-batch k holds rows
    j * K + k. The result equals the gradient of the whole mini-batch's token-mean (or seq-mean) loss.
    `config.remat` (if set) overrides the model config's remat, as in `Learner`.
    With LoRA, `params` are the adapters and `base_params` the frozen model (grads: adapter-shaped).
    window: the LM head's response window (`response_window_for`; 0: every position).
    Returns (grads: params-shaped f32 tree, metrics: dict of scalars).
    """
    _fill_reference(batch, None, config=config)
    if config.remat is not None:
        model_config = model_config.replace(remat=config.remat)
    n = batch.tokens.shape[0]
    micro = micro_batch_size or n
    if n % micro:
        raise BatchError(f"{n} rows are not a multiple of micro_batch_size={micro}")
    micro_batches = jax.tree.map(lambda a: _split_rows(a, 1, n // micro)[0], batch)
    return _accumulate(
        params,
        micro_batches,
        model_config=model_config,
        config=config,
        base_params=base_params if config.lora.enabled else None,
        window=window,
    )


# -------------------------------------------------------------------------------------- train step


def _logprob_pass(params, batches: ConversationBatch, *, model_config, config, constrain_micro=None, window: int = 0):
    """[M, K, mb, T] leaves -> [M, K, mb, T] log-probs under `params`, no gradient (in the response window only
    when `window` > 0)."""
    m, k = batches.tokens.shape[:2]
    flat = jax.tree.map(
        lambda a: a.reshape((m * k,) + a.shape[2:]),
        (batches.tokens, batches.token_mask, batches.loss_mask, batches.segment_ids),
    )

    def body(_, xs):
        tokens, mask, loss_mask, segments = xs
        if constrain_micro is not None:
            tokens, mask, loss_mask = (constrain_micro(a, 0) for a in (tokens, mask, loss_mask))
            segments = None if segments is None else constrain_micro(segments, 0)
        logp, _ = token_logprobs(
            params,
            tokens,
            mask,
            config=model_config,
            chunk_size=config.logits_chunk_size,
            temperature=config.logprob_temperature,
            **_row_layout(segments, loss_mask, window),
        )
        return None, logp

    _, logp = jax.lax.scan(body, None, flat)
    return jax.lax.stop_gradient(logp.reshape(batches.tokens.shape))


def train_step_fn(
    state: TrainState,
    batch: ConversationBatch,
    ref_params,
    base_params=None,
    *,
    model_config: ModelConfig,
    config: LearnerConfig,
    optimizer: optax.GradientTransformation,
    mesh: Mesh | None = None,
    param_shardings=None,
    window: int = 0,
):
    """The pure train step (see the module docstring); `Learner` jits it with shardings and donation.

    window: the LM head's response window (`response_window_for`; 0: every position).

    With LoRA (`config.lora.rank > 0`), `state.params` are the adapters, `base_params` the frozen model: the loss
    runs on `lora.merge(base_params, adapters)`, gradients and AdamW touch the adapters only, and the reference
    log-probs (kl_coef > 0, none given) come from `base_params` (the base model with the adapters off).

    Returns (new_state, metrics: dict of scalars, per_update: dict of [M] arrays 'loss', 'grad_norm', 'finite').
    """
    _fill_reference(batch, base_params if ref_params is None and config.lora.enabled else ref_params, config=config)
    n = batch.tokens.shape[0]
    m, k, _ = config.split(n)

    constrain = constrain_micro = constrain_grads = None
    if mesh is not None:
        rules_axes = sharding_lib.DEFAULT_RULES["batch"]
        row_axes = tuple(a for a in rules_axes if mesh.shape.get(a, 1) > 1)

        def constrain(x, axis):
            size = int(np.prod([mesh.shape[a] for a in row_axes])) if row_axes else 1
            spec = [None] * x.ndim
            if row_axes and x.shape[axis] % size == 0:
                spec[axis] = row_axes if len(row_axes) > 1 else row_axes[0]
            return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))

        constrain_micro = constrain
        if param_shardings is not None:

            def constrain_grads(tree):
                return jax.lax.with_sharding_constraint(tree, param_shardings)

    batches = jax.tree.map(lambda a: _split_rows(a, m, k, constrain), batch)
    params0 = state.params
    use_lora = config.lora.enabled
    if use_lora:
        if base_params is None:
            raise LearnerConfigError("a LoRA train step needs the frozen base params (Learner.init_state)")
        constrain_grads = None  # the adapters are replicated
        if ref_params is None:
            ref_params = base_params  # the base model, adapters off: no second copy of the weights
    pass_kw = dict(model_config=model_config, config=config, constrain_micro=constrain_micro, window=window)
    # One update per step: its params are the behaviour policy, so the loss reads its own log-probs as the old ones.
    on_policy = config.loss.kind == "grpo" and config.recompute_old_logprobs and m == 1
    if config.loss.kind == "grpo":
        if config.recompute_old_logprobs and not on_policy:
            policy0 = lora_lib.merge(base_params, params0, config.lora) if use_lora else params0
            batches = batches.replace(old_logprobs=_logprob_pass(policy0, batches, **pass_kw))
        if config.loss.uses_reference and batches.ref_logprobs is None:
            batches = batches.replace(ref_logprobs=_logprob_pass(ref_params, batches, **pass_kw))

    lr = learning_rate_schedule(config.optimizer)(state.step)
    opt_state = set_learning_rate(state.opt_state, lr)

    def update(carry, mini):
        params, opt_state, skipped = carry
        grads, metrics = _accumulate(
            params,
            mini,
            model_config=model_config,
            config=config,
            constrain_micro=constrain_micro,
            constrain_grads=constrain_grads,
            base_params=base_params if use_lora else None,
            window=window,
            on_policy=on_policy,
        )
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        # A mini-batch of padding rows only (no response token) has nothing to learn from: AdamW's momentum and
        # weight decay would still move the params, so it is skipped like a non-finite one (counted apart).
        has_tokens = jnp.any(mini.loss_mask)
        apply = finite & has_tokens

        def step(operands):
            params, opt_state, grads = operands
            updates, new_opt_state = optimizer.update(grads, opt_state, params)
            # AdamW's arithmetic meets the f32 gradients and comes out f32; the state keeps the dtypes it was made
            # with (the params' dtype for the moments), or the scan's carry would change type with bf16 params.
            new_opt_state = jax.tree.map(lambda new, old: new.astype(old.dtype), new_opt_state, opt_state)
            return optax.apply_updates(params, updates), new_opt_state

        # A branch, not a select between the updated and the old trees: a select keeps both in the step's
        # temporaries (about one f32 copy of the params more in XLA's memory analysis at Qwen2.5-0.5B shapes).
        params, opt_state = jax.lax.cond(apply, step, lambda operands: operands[:2], (params, opt_state, grads))
        skipped = skipped + jnp.where(finite, 0, 1).astype(jnp.int32)
        return (params, opt_state, skipped), dict(metrics, grad_norm=grad_norm, finite=finite, applied=apply)

    (params, opt_state, skipped), per = jax.lax.scan(update, (params0, opt_state, state.skipped_updates), batches)

    finite, used = per["finite"], per["applied"]
    applied = jnp.sum(used.astype(jnp.float32))
    metrics = {}
    for name, values in per.items():
        if name in ("finite", "applied"):
            continue
        if name == "response_tokens":
            metrics[name] = jnp.sum(values)
        elif name.endswith("_max"):
            metrics[name] = jnp.max(jnp.where(used, values, -jnp.inf))
        else:
            metrics[name] = jnp.sum(jnp.where(used, values, 0.0)) / applied  # nan when nothing was applied
    metrics["learning_rate"] = lr
    metrics["updates"] = jnp.asarray(m, jnp.float32)
    metrics["nonfinite_updates"] = m - jnp.sum(finite.astype(jnp.float32))
    metrics["empty_updates"] = jnp.sum((finite & ~used).astype(jnp.float32))  # padding-only mini-batches
    metrics["conversations"] = jnp.sum(jnp.any(batch.loss_mask, axis=-1).astype(jnp.float32))
    metrics["real_tokens"] = jnp.sum(batch.token_mask.astype(jnp.float32))
    new_state = TrainState(params=params, opt_state=opt_state, step=state.step + 1, skipped_updates=skipped)
    metrics["skipped_updates_total"] = skipped.astype(jnp.float32)
    per_update = {"loss": per["loss"], "grad_norm": per["grad_norm"], "finite": finite}
    return new_state, metrics, per_update


# ------------------------------------------------------------------------------------------ Learner

_EXECUTABLES: dict[Any, Any] = {}


class Learner:
    """Host-side owner of the jitted train step, shardings and optimiser.

    Usage:
        learner = Learner(model_config, LearnerConfig(...), mesh=make_mesh(data, fsdp, tensor))
        ref = learner.copy_params(params) if learner.needs_reference else None   # before init_state
        state = learner.init_state(params)        # takes ownership of `params` (they are donated later)
        batch = build_conversation_batch(..., rows_multiple=learner.rows_multiple)
        state, metrics = learner.train_step(state, batch, ref_params=ref)

    `mesh=None` runs on the default device without sharding annotations.

    Multi-process (a mesh spanning several processes, one per host): every process calls `train_step` with its
    own host rows (the same row count and length on every process, a multiple of `process_rows_multiple`); the
    batch is all processes' rows together, and the returned metrics are global.
    """

    def __init__(self, model_config: ModelConfig, config: LearnerConfig = LearnerConfig(), *, mesh: Mesh | None = None):
        if not isinstance(config, LearnerConfig):
            raise LearnerConfigError(f"config must be a LearnerConfig, got {type(config).__name__}")
        if config.remat is not None:
            model_config = model_config.replace(remat=config.remat)
        dev = sharding_lib.batch_multiple(mesh)
        if config.micro_batch_size is not None and config.micro_batch_size % dev:
            raise LearnerConfigError(
                f"learner.micro_batch_size={config.micro_batch_size} must be a multiple of the mesh's batch "
                f"shards (data x fsdp = {dev}) so every device gets whole rows of every micro-batch"
            )
        self.model_config = model_config
        self.config = config
        self.mesh = mesh
        self.optimizer = make_optimizer(config.optimizer)
        self.lora = config.lora
        self.base_params = None  # LoRA: the frozen model (set by init_state)
        self._abstract_base = model_abstract_params(model_config)
        self._base_shardings = sharding_lib.param_shardings(self._abstract_base, mesh) if mesh is not None else None
        if self.lora.enabled:
            # The trained params are the adapters (small: replicated); the base keeps the model's shardings.
            self._abstract_params = lora_lib.abstract_adapters(self._abstract_base, model_config, self.lora)
            rep = self._replicated()
            self._param_shardings = jax.tree.map(lambda _: rep, self._abstract_params) if mesh is not None else None
        else:
            self._abstract_params = self._abstract_base
            self._param_shardings = self._base_shardings
        self._steps: dict[Any, Any] = {}
        self._logprob_fns: dict[Any, Any] = {}

    # ---- layout

    @property
    def needs_reference(self) -> bool:
        """Whether train steps need reference params from the caller (GRPO with kl_coef > 0, without LoRA: with
        LoRA the frozen base params are the reference)."""
        return self.config.loss.uses_reference and not self.lora.enabled

    @property
    def rows_multiple(self) -> int:
        """Batch rows must be a multiple of this: mini-batches x micro-batch rows, micro-batches split evenly over
        the mesh's batch axes."""
        dev = sharding_lib.batch_multiple(self.mesh)
        micro = self.config.micro_batch_size or dev
        return self.config.num_minibatches * micro

    @property
    def process_rows_multiple(self) -> int:
        """Rows each process supplies must be a multiple of this (`rows_multiple` / processes of the mesh)."""
        procs = multiprocess.mesh_process_count(self.mesh)
        if self.rows_multiple % procs:
            raise LearnerConfigError(
                f"rows_multiple={self.rows_multiple} is not a multiple of the mesh's {procs} processes"
            )
        return self.rows_multiple // procs

    def global_rows(self, batch: ConversationBatch) -> int:
        """Rows of the batch the step sees: a host batch holds this process's rows of a multi-process batch."""
        n = int(batch.tokens.shape[0])
        if isinstance(batch.tokens, jax.Array) and not batch.tokens.is_fully_addressable:
            return n
        return n * multiprocess.mesh_process_count(self.mesh)

    def _replicated(self):
        return NamedSharding(self.mesh, P()) if self.mesh is not None else None

    def param_shardings(self):
        """Pytree of `NamedSharding` for the params (None without a mesh)."""
        return self._param_shardings

    def state_shardings(self) -> TrainState | None:
        """A `TrainState` of `NamedSharding`s (None without a mesh)."""
        if self.mesh is None:
            return None
        rep = self._replicated()
        abstract_opt = jax.eval_shape(self.optimizer.init, self._abstract_params)
        opt = optax.tree_map_params(
            self.optimizer, lambda _, s: s, abstract_opt, self._param_shardings, transform_non_params=lambda _: rep
        )
        return TrainState(params=self._param_shardings, opt_state=opt, step=rep, skipped_updates=rep)

    def abstract_state(self) -> TrainState:
        """The state as `jax.ShapeDtypeStruct`s carrying their shardings: the restore target for checkpoints."""
        abstract = jax.eval_shape(lambda p: init_train_state(p, self.optimizer), self._abstract_params)
        shardings = self.state_shardings()
        if shardings is None:
            return abstract
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

    def batch_shardings(self, batch: ConversationBatch):
        if self.mesh is None:
            return None
        n = self.global_rows(batch)
        return jax.tree.map(lambda a: sharding_lib.batch_sharding(self.mesh, a.ndim, n), batch)

    # ---- state

    def init_state(self, params) -> TrainState:
        """A fresh `TrainState` on the mesh. Takes ownership of `params` (placed on their shardings; the first
        train step donates them): keep a separate copy (`copy_params`) if you need the originals.

        With LoRA, `params` become the learner's frozen `base_params` (never donated, never updated) and the
        state holds fresh adapters (`lora.init_adapters`, seed `lora.seed`) and their optimiser state only. A
        restored state (adapters) replaces the returned one; the base comes from the same model again."""
        if self.lora.enabled:
            if self._base_shardings is not None:
                params = jax.device_put(params, self._base_shardings)
            self.base_params = params
            init = functools.partial(lora_lib.init_adapters, model_config=self.model_config, config=self.lora)
            params = jax.jit(lambda p: init(p), out_shardings=self._param_shardings)(params)
        elif self._param_shardings is not None:
            params = jax.device_put(params, self._param_shardings)
        shardings = self.state_shardings()
        init_opt = jax.jit(self.optimizer.init, out_shardings=shardings.opt_state if shardings is not None else None)
        rep = self._replicated()
        counters = jax.jit(lambda: (jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)), out_shardings=(rep, rep))
        step, skipped = counters()  # two distinct buffers (both are donated)
        return TrainState(params=params, opt_state=init_opt(params), step=step, skipped_updates=skipped)

    def abstract_policy_params(self):
        """The model params' shapes (what `policy_params` returns), as `jax.ShapeDtypeStruct`s."""
        return self._abstract_base

    def policy_params(self, state: TrainState):
        """The params the policy samples with: `state.params`, or with LoRA the base with the adapters merged in
        (one jitted merge: a fresh copy of the weights on the base's shardings)."""
        if not self.lora.enabled:
            return state.params
        if "merge" not in self._logprob_fns:
            self._logprob_fns["merge"] = jax.jit(
                functools.partial(lora_lib.merge, config=self.lora), out_shardings=self._base_shardings
            )
        return self._logprob_fns["merge"](self.base_params, state.params)

    def copy_params(self, params):
        """A copy of `params` in fresh buffers on the params' shardings (e.g. the frozen KL reference)."""
        return jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=self._base_shardings)(params)

    def put_batch(self, batch: ConversationBatch) -> ConversationBatch:
        """Moves a (host) batch onto the mesh, rows sharded over the batch axes (in a multi-process mesh: this
        process's rows of the global batch)."""
        if multiprocess.is_multiprocess(self.mesh) and self.global_rows(batch) != batch.tokens.shape[0]:
            return jax.tree.map(lambda a: multiprocess.put_rows(a, self.mesh), batch)
        shardings = self.batch_shardings(batch)
        return jax.device_put(batch, shardings) if shardings is not None else jax.device_put(batch)

    # ---- steps

    def step_config(self, num_rows: int, length: int) -> LearnerConfig:
        """The config a train step on `num_rows` x `length` runs with: micro_batch_size resolved from
        `micro_batch_tokens` (see `LearnerConfig`) when it is not set."""
        config = self.config
        if config.micro_batch_size is not None:
            return config
        tokens = config.micro_batch_tokens
        if tokens is None:
            platform = self.mesh.devices.flat[0].platform if self.mesh is not None else jax.default_backend()
            tokens = tiling.CPU_TILE_TOKENS if platform == "cpu" else 0
        per_mb = num_rows // config.num_minibatches
        rows = tiling.rows_per_tile(per_mb, length, tokens, sharding_lib.batch_multiple(self.mesh))
        return config if rows == per_mb else config.replace(micro_batch_size=rows)

    def _compiled_step(self, batch: ConversationBatch, with_ref_params: bool, window: int, config: LearnerConfig):
        key = (batch.tokens.shape, batch.ref_logprobs is not None, with_ref_params, batch.packed, window, config)
        if key not in self._steps:
            fn = functools.partial(
                train_step_fn,
                model_config=self.model_config,
                config=config,
                optimizer=self.optimizer,
                mesh=self.mesh,
                param_shardings=self._param_shardings,
                window=window,
            )
            if self.mesh is None:
                self._steps[key] = jax.jit(fn, donate_argnums=0)
            else:
                rep = self._replicated()
                ref_sh = self._base_shardings if with_ref_params else None
                base_sh = self._base_shardings if self.lora.enabled else None
                self._steps[key] = jax.jit(
                    fn,
                    donate_argnums=0,
                    in_shardings=(self.state_shardings(), self.batch_shardings(batch), ref_sh, base_sh),
                    out_shardings=(self.state_shardings(), rep, rep),
                )
        return self._steps[key]

    def train_step(self, state: TrainState, batch: ConversationBatch, ref_params=None):
        """One rollout's worth of updates. `state` is donated (do not reuse it). Returns (new_state, metrics) with
        metrics as Python floats (see `train_step_fn`, plus 'step', 'learner_time_s' (execution only),
        'compile_time_s' (non-zero on the first step of a new batch shape), 'tokens_per_s' (real tokens of the
        batch per second of execution)).

        Raises NonFiniteError (with on_nonfinite='raise') after a step that skipped updates; `err.state` holds
        the returned state (which excludes the bad updates).
        """
        n = self.global_rows(batch)
        self.config.split(n)  # clear error on a bad row count before tracing
        if batch.packed and self.config.loss.aggregation != "token-mean":
            raise LearnerConfigError(
                f"packed batches (several conversations per row) need loss.aggregation "
                f"'token-mean', got {self.config.loss.aggregation!r}: the per-sequence mean "
                f"would average over rows, not conversations"
            )
        if self.mesh is not None and n % sharding_lib.batch_multiple(self.mesh):
            raise BatchError(
                f"batch has {n} rows, not a multiple of the mesh's batch axes "
                f"({sharding_lib.batch_multiple(self.mesh)}); pad with rows_multiple="
                f"{self.rows_multiple}"
            )
        if self.lora.enabled and self.base_params is None:
            raise LearnerConfigError("a LoRA learner needs its base params: call init_state(params) first")
        base = self.base_params if self.lora.enabled else None
        _fill_reference(batch, ref_params if base is None else base, config=self.config)
        if not (self.config.loss.uses_reference and batch.ref_logprobs is None) or base is not None:
            ref_params = None  # not needed (LoRA: the base is the reference): never keep it alive in the program
        # Executables are shared by every Learner with the same configs and mesh (e.g. after a restart in-process).
        # (on_nonfinite only changes what the host does afterwards, so it is not part of the key.)
        window = response_window_for(batch, self.config, self.mesh)
        config = self.step_config(n, int(batch.tokens.shape[1]))
        batch = self.put_batch(batch)
        key = (
            self.model_config,
            config.replace(on_nonfinite="skip"),
            self.mesh,
            batch.tokens.shape,
            batch.ref_logprobs is not None,
            ref_params is not None,
            batch.packed,
            window,
        )
        compile_s = 0.0
        if key not in _EXECUTABLES:
            t0 = time.perf_counter()
            jitted = self._compiled_step(batch, ref_params is not None, window, config)
            _EXECUTABLES[key] = jitted.lower(state, batch, ref_params, base).compile()
            compile_s = time.perf_counter() - t0
        step_fn = _EXECUTABLES[key]
        t0 = time.perf_counter()
        state, metrics, per_update = step_fn(state, batch, ref_params, base)
        metrics, per_update = jax.device_get((metrics, per_update))
        elapsed = time.perf_counter() - t0
        out = {name: float(v) for name, v in metrics.items()}
        out["step"] = float(jax.device_get(state.step))
        out["learner_time_s"] = elapsed
        out["compile_time_s"] = compile_s
        out["tokens_per_s"] = out["real_tokens"] / max(elapsed, 1e-9)
        if self.config.on_nonfinite == "raise" and out["nonfinite_updates"] > 0:
            bad = [i for i, ok in enumerate(per_update["finite"]) if not ok]
            details = ", ".join(
                f"update {i}: loss={per_update['loss'][i]:.4g}, grad_norm={per_update['grad_norm'][i]:.4g}" for i in bad
            )
            err = NonFiniteError(
                f"train step {int(out['step']) - 1}: {len(bad)} of {len(per_update['finite'])} mini-batch updates "
                f"had a non-finite loss or gradient ({details}); they were not applied. Set "
                f"learner.on_nonfinite='skip' to skip such updates and continue."
            )
            err.state = state
            err.metrics = out
            raise err
        return state, out

    def logprobs(self, params, batch: ConversationBatch) -> jax.Array:
        """[N, T] log-prob of every token under `params` at `config.logprob_temperature` (0 at position 0), e.g.
        reference log-probs; packed batches too (there a conversation's first token gets a meaningless value: never
        a response token)."""
        key = (batch.tokens.shape, batch.packed)
        segments = batch.segment_ids if batch.packed else jnp.zeros((), jnp.int32)
        if key not in self._logprob_fns:

            def fn(p, t, m, seg):
                layout = _row_layout(seg) if batch.packed else {}
                return token_logprobs(
                    p,
                    t,
                    m,
                    config=self.model_config,
                    chunk_size=self.config.logits_chunk_size,
                    temperature=self.config.logprob_temperature,
                    **layout,
                )[0]

            if self.mesh is None:
                self._logprob_fns[key] = jax.jit(fn)
            else:
                rows = sharding_lib.batch_sharding(self.mesh, 2, key[0][0])
                seg_sh = rows if batch.packed else NamedSharding(self.mesh, P())
                self._logprob_fns[key] = jax.jit(
                    fn, in_shardings=(self._base_shardings, rows, rows, seg_sh), out_shardings=rows
                )
        return self._logprob_fns[key](params, batch.tokens, batch.token_mask, segments)
