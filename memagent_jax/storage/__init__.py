"""Where runs keep their state: training checkpoints and the rule for workdir / output paths.

    checkpoint.py  Orbax CheckpointManager wrapper (state, data position, RNG; async, keep-N, atomic, verified)
    paths.py       object-store URLs refused for workdirs and outputs; input-file checks, same-file test (no JAX)

This file imports none of its modules: `from memagent_jax.storage import paths` stays light, and only
`storage.checkpoint` loads JAX and Orbax.
"""
