"""The accuracy-against-length plot: every length label is drawn inside the axes, whatever the accuracy."""

import pytest

from memagent_jax.evaluation.report import Estimate, FileResult, plot_accuracy_vs_length


def result(model: str, tokens: float, accuracy: float, n: int = 32) -> FileResult:
    est = Estimate(accuracy, max(accuracy - 0.05, 0.0), min(accuracy + 0.05, 1.0), n, "wilson")
    return FileResult(
        model=model,
        model_path="/m",
        file=f"/f{tokens:.0f}.jsonl",
        file_key=f"f{tokens:.0f}",
        label=f"{tokens:.0f}",
        metric="auto",
        metrics_used={"string_match_all": n},
        extract="boxed",
        n=n,
        skipped=0,
        accuracy=est,
        em=est,
        f1=est,
        sub_em=est,
        mean_doc_tokens=tokens,
        mean_chunks=tokens / 32,
        total_doc_tokens=int(tokens * n),
        wall_s=1.0,
        doc_tokens_per_s=1.0,
    )


@pytest.mark.parametrize("long_point", [1.0, 0.95, 0.5])
def test_length_labels_lie_inside_the_axes(tmp_path, monkeypatch, long_point):
    from matplotlib.figure import Figure

    saved = []
    real_savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (saved.append(fig), real_savefig(fig, *a, **k)))
    results = [result("RL", t, a) for t, a in ((64, 1.0), (256, 0.99), (1_048_576, long_point))]
    results += [result("warm_start", t, a) for t, a in ((64, 0.9), (256, 0.6), (1_048_576, 0.1))]
    plot_accuracy_vs_length(results, str(tmp_path / "plot.png"), train_tokens=64)
    (fig,) = saved
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    box = ax.get_window_extent(renderer)
    labels = {t.get_text(): t.get_window_extent(renderer) for t in ax.texts if t.get_text().endswith("x")}
    assert set(labels) == {"1x", "4x", "16384x"}
    for text, extent in labels.items():
        assert box.y0 <= extent.y0 and extent.y1 <= box.y1, f"label {text} leaves the axes: {extent} vs {box}"
