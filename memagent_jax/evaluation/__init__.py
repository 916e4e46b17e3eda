"""Scoring, the evaluation loop and reporting: the verifier (answer extraction, normalisation, metrics, training
rewards), the evaluation of memory agents on evaluation files, its report (statistics, results, tables, report
files, accuracy-vs-length plot) and the memory-trace report.

    verifier.py   answer extraction, normalisation, EM / F1 / sub-EM / string-match-all, training rewards
    specs.py      model specs, evaluation-file lists, file keys and length labels, option checks (EvalConfigError)
    loop.py       model loading, warm-up, `evaluate_agent` (one file) and `evaluate_models` (models x files)
    report.py     Wilson / normal intervals, results, tables, report files, the accuracy-vs-length plot
    traces.py     human-readable memory traces (Markdown + HTML)
    key_confusion.py  which keys a keyed-recall agent confuses: one teacher-forced memory step per pair of keys

    from memagent_jax.evaluation import evaluate_models
    results = evaluate_models({"rl": "/ckpt/rl"}, ["eval_50docs.json"], "runs/x/eval")

The names below load on first use (PEP 562) and this file imports none of the modules: `from
memagent_jax.evaluation import verifier` loads the verifier alone, and only `loop.py` runs JAX (inside its
functions). The `evaluate` entry point turns its config into one `evaluate_models` call.
"""

from memagent_jax._lazy import lazy_exports

# name -> submodule, imported on first access.
_EXPORTS = {
    "EvalConfigError": ".specs",
    "ROW_ERROR_POLICIES": ".specs",
    "SCHEDULING": ".specs",
    "check_model_folder": ".specs",
    "check_options": ".specs",
    "check_outputs_not_inputs": ".specs",
    "file_keys": ".specs",
    "length_label": ".specs",
    "open_eval_file": ".specs",
    "parse_eval_files": ".specs",
    "parse_models": ".specs",
    "LoadedModel": ".loop",
    "NonFiniteOutputError": ".loop",
    "evaluate_agent": ".loop",
    "evaluate_models": ".loop",
    "load_model": ".loop",
    "resolve_metric": ".loop",
    "row_keys": ".loop",
    "score_response": ".loop",
    "CSV_FIELDS": ".report",
    "SCORE_NAMES": ".report",
    "Z95": ".report",
    "Estimate": ".report",
    "EvalResults": ".report",
    "FileResult": ".report",
    "estimate": ".report",
    "failure_summary": ".report",
    "format_percent": ".report",
    "format_table": ".report",
    "format_tokens": ".report",
    "normal_interval": ".report",
    "plot_accuracy_vs_length": ".report",
    "summarize": ".report",
    "wilson_interval": ".report",
    "write_predictions": ".report",
    "write_reports": ".report",
    "KeyConfusion": ".key_confusion",
    "key_confusion": ".key_confusion",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
