"""Multi-conversation GRPO learner: conversation batches, advantages, losses, the sharded train step, metrics."""

from memagent_jax.rl.advantages import broadcast_to_conversations, dynamic_sampling_mask, group_advantages
from memagent_jax.rl.batch import (
    BatchError,
    ConversationBatch,
    build_conversation_batch,
    pad_rows,
    shuffle_rows,
    validate_batch,
)
from memagent_jax.rl.learner import (
    Learner,
    LearnerConfig,
    LearnerConfigError,
    NonFiniteError,
    OptimizerConfig,
    TrainState,
    accumulate_gradients,
    learning_rate_schedule,
    make_optimizer,
)
from memagent_jax.rl.logprobs import token_logprobs
from memagent_jax.rl.losses import LossConfig, LossConfigError, policy_loss, sft_loss
from memagent_jax.rl.metrics import MetricsWriter

__all__ = [
    "BatchError",
    "ConversationBatch",
    "Learner",
    "LearnerConfig",
    "LearnerConfigError",
    "LossConfig",
    "LossConfigError",
    "MetricsWriter",
    "NonFiniteError",
    "OptimizerConfig",
    "TrainState",
    "accumulate_gradients",
    "broadcast_to_conversations",
    "build_conversation_batch",
    "dynamic_sampling_mask",
    "group_advantages",
    "learning_rate_schedule",
    "make_optimizer",
    "pad_rows",
    "policy_loss",
    "sft_loss",
    "shuffle_rows",
    "token_logprobs",
    "validate_batch",
]
