"""Multi-conversation GRPO: conversation batches, advantages, losses, the sharded train step, metrics, the recipe's
config checks (`recipe`) and the training loop (`trainer`).

The names below load on first use (PEP 562), so importing a light submodule (`rl.recipe`) does not pull in JAX.
"""

from memagent_jax._lazy import lazy_exports

# name -> submodule, imported on first access.
_EXPORTS = {
    "broadcast_to_conversations": ".advantages",
    "dynamic_sampling_mask": ".advantages",
    "group_advantages": ".advantages",
    "BatchError": ".batch",
    "ConversationBatch": ".batch",
    "build_conversation_batch": ".batch",
    "pad_rows": ".batch",
    "shuffle_rows": ".batch",
    "validate_batch": ".batch",
    "Learner": ".learner",
    "LearnerConfig": ".learner",
    "LearnerConfigError": ".learner",
    "NonFiniteError": ".learner",
    "OptimizerConfig": ".learner",
    "TrainState": ".learner",
    "accumulate_gradients": ".learner",
    "learning_rate_schedule": ".learner",
    "make_optimizer": ".learner",
    "token_logprobs": ".logprobs",
    "LossConfig": ".losses",
    "LossConfigError": ".losses",
    "policy_loss": ".losses",
    "sft_loss": ".losses",
    "MetricsWriter": ".metrics",
}

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
