"""`python -m memagent_jax.serve --model DIR ...` (see `memagent_jax.serve`)."""

from memagent_jax.serve.server import main

if __name__ == "__main__":
    raise SystemExit(main())
