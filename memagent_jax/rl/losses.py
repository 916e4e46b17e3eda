"""Policy-gradient (GRPO/DAPO) and supervised losses on per-token log-probs: pure functions.

Shapes: n conversations (rows), T tokens. All per-token inputs are aligned with the tokens: `logprobs[:, t]` is
log p(tokens[:, t] | tokens[:, :t]) (predicted by the logits at t - 1); only positions with `loss_mask` True
count.

Clipped surrogate, per response token, with r = exp(logp - old_logp) and advantage A (of the row's trajectory):

    l1 = -A * r
    l2 = -A * clip(r, 1 - clip_low, 1 + clip_high)
    l  = max(l1, l2)                              (PPO pessimistic bound, asymmetric clip as in DAPO)
    if A < 0 and dual_clip c:  l = min(l, -c * A)  (dual clip: the loss of a negative-advantage token is at
                                                    most c * |A|, however large r grows)

Aggregation ("token-mean", the default): the sum over every response token of every row of the (mini-)batch,
divided by the number of those tokens; "seq-mean-token-mean": each row's token mean, averaged over the rows that
have response tokens. Both take the denominator as an argument so that micro-batches of one mini-batch can each
divide by the *whole* mini-batch's count and their sum equals the mini-batch loss exactly.

KL to a frozen reference, the low-variance k3 estimator per token, with d = ref_logp - logp:

    k3 = exp(d) - d - 1   (>= 0, unbiased for KL(pi || ref) under samples from pi)
    k3 = clip(k3, -kl_clamp, kl_clamp)   when kl_clamp is set (the reference recipe: 10, as verl's low-variance
                                          KL does; a clamped token contributes no KL gradient)

Entropy of the policy's next-token distribution, from the logits (`entropy_from_logits`).

    total = pg + kl_coef * kl - entropy_coef * entropy          (GRPO)
    total = -mean logp                                          (SFT warm start, same aggregation)

Metric values are all linear in the per-token sums (or a max, for keys ending in `_max`), divided by the same
denominators, so the metrics of micro-batches add up to those of the mini-batch (see `reduce_metric`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from memagent_jax import settings

__all__ = [
    "LossConfig",
    "LossConfigError",
    "AGGREGATIONS",
    "clipped_surrogate",
    "k3_kl",
    "entropy_from_logits",
    "aggregate",
    "policy_loss",
    "sft_loss",
    "compute_loss",
    "reduce_metric",
    "metric_identity",
]

AGGREGATIONS = ("token-mean", "seq-mean-token-mean")
LOSS_KINDS = ("grpo", "sft")


class LossConfigError(settings.SettingError):
    """A loss setting is out of range; the message names the field."""


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Loss settings (hashable: a static argument under jit).

    kind: 'grpo' (clipped policy gradient + KL + entropy) or 'sft' (cross-entropy on response tokens).
    clip_low, clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high] (DAPO clip-higher: clip_high > low).
    dual_clip: c > 1, bounds the loss of a negative-advantage token by c * |A|; None (or 0) disables the dual clip.
    kl_coef: weight of the k3 KL to the reference (0: no KL term, and no reference model is needed).
    entropy_coef: weight of the entropy bonus (subtracted from the loss; 0: entropy is only reported).
    aggregation: 'token-mean' or 'seq-mean-token-mean'.
    log_ratio_clamp: log-ratios (logp - old, ref - logp) are clamped to [-x, x] before exp, so one wildly
      off-policy token cannot overflow to inf (e^20 ~ 5e8; the clip / dual clip bound the loss well before).
    kl_clamp: None or 0 (off), or x > 0: each token's k3 KL value is clamped to [-x, x] after it is computed (the
      reference recipe uses 10); a token whose k3 exceeds x adds exactly x to the KL and no gradient.
    """

    kind: str = "grpo"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = 3.0
    kl_coef: float = 0.001
    entropy_coef: float = 0.0
    aggregation: str = "token-mean"
    log_ratio_clamp: float = 20.0
    kl_clamp: float | None = None

    def __post_init__(self):
        e = LossConfigError
        settings.choice("loss.kind", self.kind, LOSS_KINDS, error=e)
        for name in ("kl_coef", "entropy_coef", "clip_high"):
            settings.real(f"loss.{name}", getattr(self, name), low=0, error=e)
        settings.real(
            "loss.clip_low",
            self.clip_low,
            low=0,
            high=1,
            high_open=True,
            allowed="in [0, 1) (the ratio's lower bound is 1 - clip_low)",
            error=e,
        )
        if self.dual_clip == 0:  # 0 turns it off, as in the configs
            object.__setattr__(self, "dual_clip", None)
        settings.real(
            "loss.dual_clip",
            self.dual_clip,
            low=1,
            low_open=True,
            none_ok=True,
            allowed="> 1, or 0 / None to turn the dual clip off",
            error=e,
        )
        settings.choice("loss.aggregation", self.aggregation, AGGREGATIONS, error=e)
        settings.real("loss.log_ratio_clamp", self.log_ratio_clamp, low=0, low_open=True, error=e)
        if self.kl_clamp == 0:  # 0 = no clamp, as in the configs
            object.__setattr__(self, "kl_clamp", None)
        settings.real(
            "loss.kl_clamp",
            self.kl_clamp,
            low=0,
            low_open=True,
            none_ok=True,
            allowed="> 0, or 0 / None for no clamp",
            error=e,
        )

    @property
    def uses_reference(self) -> bool:
        """Whether a reference policy is needed (GRPO with kl_coef > 0)."""
        return self.kind == "grpo" and self.kl_coef > 0

    def replace(self, **changes) -> LossConfig:
        return dataclasses.replace(self, **changes)


# ------------------------------------------------------------------------------------------- pieces


def clipped_surrogate(log_ratio, advantages, *, clip_low: float, clip_high: float, dual_clip: float | None):
    """Per-token clipped policy-gradient loss.

    Args:
      log_ratio: [n, T] logp - old_logp (already clamped by the caller if wanted).
      advantages: [n, T] (or broadcastable) advantage of each token.
    Returns:
      (loss [n, T], ratio [n, T], flags) where flags is a dict of [n, T] bools: 'clip_low' (A < 0 and
      r < 1 - clip_low: the lower clip is active), 'clip_high' (A > 0 and r > 1 + clip_high), 'dual' (A < 0 and
      the dual clip is active: -A * r > -c * A, i.e. r > c).
    """
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = jnp.maximum(unclipped, clipped)
    flags = {
        "clip_low": (advantages < 0) & (ratio < 1.0 - clip_low),
        "clip_high": (advantages > 0) & (ratio > 1.0 + clip_high),
    }
    if dual_clip is not None:
        bound = -dual_clip * advantages
        dual = (advantages < 0) & (loss > bound)
        loss = jnp.where(advantages < 0, jnp.minimum(loss, bound), loss)
        flags["dual"] = dual
    else:
        flags["dual"] = jnp.zeros_like(flags["clip_low"])
    return loss, ratio, flags


def k3_kl(logprobs, ref_logprobs, *, clamp: float | None = 20.0, value_clamp: float | None = None):
    """Per-token k3 estimate of KL(pi || ref), [n, T] -> [n, T]: exp(d) - d - 1 with d = ref - logp.

    clamp: d is clamped to [-clamp, clamp] before exp (overflow guard). value_clamp: the k3 value itself is
    clamped to [-value_clamp, value_clamp] (`LossConfig.kl_clamp`; zero gradient where it binds).
    """
    d = ref_logprobs - logprobs
    if clamp is not None:
        d = jnp.clip(d, -clamp, clamp)
    k3 = jnp.exp(d) - d - 1.0
    if value_clamp is not None:
        k3 = jnp.clip(k3, -value_clamp, value_clamp)
    return k3


def entropy_from_logits(logits):
    """Entropy (nats) of softmax(logits) over the last axis: [..., V] -> [...], computed in f32."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    probs = jnp.exp(logits - lse[..., None])
    return lse - jnp.sum(probs * logits, axis=-1)


def _denominators(loss_mask, token_denominator, seq_denominator):
    mask = loss_mask.astype(jnp.float32)
    if token_denominator is None:
        token_denominator = jnp.maximum(jnp.sum(mask), 1.0)
    if seq_denominator is None:
        seq_denominator = jnp.maximum(jnp.sum(jnp.any(loss_mask, axis=-1).astype(jnp.float32)), 1.0)
    return mask, jnp.asarray(token_denominator, jnp.float32), jnp.asarray(seq_denominator, jnp.float32)


def aggregate(per_token, loss_mask, *, mode: str = "token-mean", token_denominator=None, seq_denominator=None):
    """Reduces a per-token quantity [n, T] to a scalar.

    token-mean:           sum_{rows, t} mask * x / token_denominator
    seq-mean-token-mean:  sum_rows (sum_t mask * x / max(1, sum_t mask)) / seq_denominator
    Defaults: token_denominator = number of response tokens, seq_denominator = number of rows that have any (both
    at least 1). Pass the whole mini-batch's counts when `per_token` is one micro-batch of it.
    """
    mask, tok_den, seq_den = _denominators(loss_mask, token_denominator, seq_denominator)
    x = jnp.where(loss_mask, per_token, 0.0)
    if mode == "token-mean":
        return jnp.sum(x) / tok_den
    if mode == "seq-mean-token-mean":
        per_row = jnp.sum(x, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
        return jnp.sum(per_row) / seq_den
    raise LossConfigError(f"loss.aggregation must be one of {AGGREGATIONS}, got {mode!r}")


def _token_mean(x, loss_mask, tok_den):
    return jnp.sum(jnp.where(loss_mask, x, 0.0)) / tok_den


# ------------------------------------------------------------------------------------------- losses


def policy_loss(
    logprobs,
    old_logprobs,
    advantages,
    loss_mask,
    *,
    config: LossConfig,
    ref_logprobs=None,
    entropy=None,
    token_denominator=None,
    seq_denominator=None,
):
    """GRPO/DAPO loss of a (micro-)batch.

    Args:
      logprobs: [n, T] f32, current policy log-probs of the tokens (differentiable).
      old_logprobs: [n, T] f32, behaviour-policy log-probs (the sampler's, or recomputed).
      advantages: [n] f32, per row (broadcast to its response tokens), or [n, T] per token (packed rows).
      loss_mask: [n, T] bool, response tokens.
      config: `LossConfig` (kind 'grpo').
      ref_logprobs: [n, T] f32 reference log-probs; required when config.kl_coef > 0.
      entropy: [n, T] f32 per-token entropy of the policy (from `entropy_from_logits`); required when
        config.entropy_coef > 0; reported as a metric when given.
      token_denominator, seq_denominator: scalars, see `aggregate`.
    Returns:
      (loss scalar, metrics dict of scalars): loss, pg_loss, kl (aggregated k3 to the reference; only when
      ref_logprobs are given), entropy (only when given), clipfrac_low / clipfrac_high / clipfrac_dual (fraction of
      response tokens where that clip is active), ratio_mean, ratio_max, approx_kl_old (token-mean k3 between old
      and current policy), logprob_mean, response_tokens (count of this (micro-)batch's response tokens).
    """
    if config.kind != "grpo":
        raise LossConfigError(f"policy_loss needs loss.kind 'grpo', got {config.kind!r}")
    if config.kl_coef > 0 and ref_logprobs is None:
        raise LossConfigError("loss.kl_coef > 0 needs ref_logprobs (or set loss.kl_coef = 0)")
    if config.entropy_coef > 0 and entropy is None:
        raise LossConfigError("loss.entropy_coef > 0 needs the per-token entropy")
    mask, tok_den, seq_den = _denominators(loss_mask, token_denominator, seq_denominator)
    agg = dict(mode=config.aggregation, token_denominator=tok_den, seq_denominator=seq_den)
    c = config.log_ratio_clamp

    log_ratio = jnp.clip(logprobs - old_logprobs, -c, c)
    adv = jnp.asarray(advantages, jnp.float32)
    adv = adv if adv.ndim == 2 else adv[:, None]
    per_token, ratio, flags = clipped_surrogate(
        log_ratio, adv, clip_low=config.clip_low, clip_high=config.clip_high, dual_clip=config.dual_clip
    )
    pg = aggregate(per_token, loss_mask, **agg)
    loss = pg
    if config.kl_coef > 0:
        kl = aggregate(k3_kl(logprobs, ref_logprobs, clamp=c, value_clamp=config.kl_clamp), loss_mask, **agg)
        loss = loss + config.kl_coef * kl
    elif ref_logprobs is not None:
        kl = jax.lax.stop_gradient(
            aggregate(k3_kl(logprobs, ref_logprobs, clamp=c, value_clamp=config.kl_clamp), loss_mask, **agg)
        )
    else:
        kl = None
    if entropy is not None:
        ent = aggregate(entropy, loss_mask, **agg)
        if config.entropy_coef > 0:
            loss = loss - config.entropy_coef * ent
        else:
            ent = jax.lax.stop_gradient(ent)
    else:
        ent = None

    sg = jax.lax.stop_gradient
    metrics = {
        "loss": sg(loss),
        "pg_loss": sg(pg),
        "clipfrac_low": _token_mean(flags["clip_low"].astype(jnp.float32), loss_mask, tok_den),
        "clipfrac_high": _token_mean(flags["clip_high"].astype(jnp.float32), loss_mask, tok_den),
        "clipfrac_dual": _token_mean(flags["dual"].astype(jnp.float32), loss_mask, tok_den),
        "ratio_mean": sg(_token_mean(ratio, loss_mask, tok_den)),
        "ratio_max": sg(jnp.max(jnp.where(loss_mask, ratio, -jnp.inf))),
        "approx_kl_old": sg(_token_mean(k3_kl(logprobs, old_logprobs, clamp=c), loss_mask, tok_den)),
        "logprob_mean": sg(_token_mean(logprobs, loss_mask, tok_den)),
        "response_tokens": jnp.sum(mask),
    }
    if kl is not None:
        metrics["kl"] = sg(kl)
    if ent is not None:
        metrics["entropy"] = sg(ent)
    return loss, metrics


def sft_loss(logprobs, loss_mask, *, config: LossConfig, entropy=None, token_denominator=None, seq_denominator=None):
    """Supervised (warm-start) loss: cross-entropy of the response tokens, aggregated like the policy loss.

    logprobs [n, T], loss_mask [n, T]. Returns (loss, metrics): loss, nll (same as loss), entropy (if given),
    logprob_mean, response_tokens.
    """
    mask, tok_den, seq_den = _denominators(loss_mask, token_denominator, seq_denominator)
    agg = dict(mode=config.aggregation, token_denominator=tok_den, seq_denominator=seq_den)
    loss = aggregate(-logprobs, loss_mask, **agg)
    sg = jax.lax.stop_gradient
    metrics = {
        "loss": sg(loss),
        "nll": sg(loss),
        "logprob_mean": sg(_token_mean(logprobs, loss_mask, tok_den)),
        "response_tokens": jnp.sum(mask),
    }
    if entropy is not None:
        metrics["entropy"] = sg(aggregate(entropy, loss_mask, **agg))
    return loss, metrics


def compute_loss(
    config: LossConfig,
    logprobs,
    loss_mask,
    *,
    old_logprobs=None,
    advantages=None,
    ref_logprobs=None,
    entropy=None,
    token_denominator=None,
    seq_denominator=None,
):
    """Dispatches on config.kind to `policy_loss` or `sft_loss` (same return value)."""
    if config.kind == "sft":
        return sft_loss(
            logprobs,
            loss_mask,
            config=config,
            entropy=entropy,
            token_denominator=token_denominator,
            seq_denominator=seq_denominator,
        )
    return policy_loss(
        logprobs,
        old_logprobs,
        advantages,
        loss_mask,
        config=config,
        ref_logprobs=ref_logprobs,
        entropy=entropy,
        token_denominator=token_denominator,
        seq_denominator=seq_denominator,
    )


def reduce_metric(name: str, a, b):
    """Combines one metric of two micro-batches of the same mini-batch: max for '*_max' keys, else the sum."""
    return jnp.maximum(a, b) if name.endswith("_max") else a + b


def metric_identity(name: str, like):
    """The identity element of `reduce_metric` for this metric (-inf for '*_max', else 0)."""
    return jnp.full_like(like, -jnp.inf) if name.endswith("_max") else jnp.zeros_like(like)
