"""Scoring and reporting: the verifier (answer extraction, normalisation, metrics, training rewards), the
evaluation report (statistics, results, tables, report files, accuracy-vs-length plot) and the memory-trace report.

    verifier.py   answer extraction, normalisation, EM / F1 / sub-EM / string-match-all, training rewards
    report.py     Wilson / normal intervals, results, tables, report files, the accuracy-vs-length plot
    traces.py     human-readable memory traces (Markdown + HTML)

Nothing here imports JAX, and this file imports none of its modules: `from memagent_jax.evaluation import
verifier` loads the verifier alone. The `evaluate` entry point runs the agents and uses these.
"""
