"""Tests of the ArrayRecord (tensorflow-datasets) builder; skipped when the tfds extra is missing."""

import subprocess
import sys

import pytest

pytest.importorskip("tensorflow_datasets")
pytest.importorskip("array_record")
pytest.importorskip("importlib_resources")

from memagent_jax.data import tfds_builder as B  # noqa: E402
from memagent_jax.data.iterator import ShardedIterator  # noqa: E402
from memagent_jax.data.records import QARecord  # noqa: E402
from memagent_jax.data.synthetic import SyntheticConfig, SyntheticDataset, whitespace_counter  # noqa: E402


def test_write_and_read_back(tmp_path):
    recs = [
        QARecord(f"q{i} é?", f"document {i}\nwith ✓", (f"a{i}", "b"), 10 + i, "src", {"num_docs": i}) for i in range(23)
    ]
    syn = SyntheticDataset(SyntheticConfig("multihop_qa", 300, seed=2), whitespace_counter, 4)
    train_rows = [
        {
            "data_source": "d",
            "prompt": [{"role": "user", "content": "q"}],
            "context": "c",
            "reward_model": {"ground_truth": ["x"]},
        }
    ]
    out = B.build_arrayrecord({"train": recs, "synthetic": syn, "rows": train_rows}, tmp_path, config_name="test")
    assert out == tmp_path / "memagent_qa" / "test" / "1.0.0"
    assert any(p.name.startswith("memagent_qa-train.array_record") for p in out.iterdir())
    back = B.open_arrayrecord(out, "train")
    assert len(back) == 23
    assert list(back) == recs  # same records, same order
    assert back[-1] == recs[-1]
    s = B.open_arrayrecord(out, "synthetic")
    assert [r.question for r in s] == [syn[i].question for i in range(4)]
    assert s[1].document == syn[1].text()
    assert B.open_arrayrecord(out, "rows")[0].answers == ("x",)
    # host-sharded, resumable reading over the random-access source
    it = ShardedIterator(back, 2, seed=0, process_index=1, process_count=2)
    next(it)
    state = it.get_state()
    expected = next(it)
    again = ShardedIterator(B.open_arrayrecord(out, "train"), 2, seed=0, process_index=1, process_count=2)
    again.set_state(state)
    assert next(again) == expected


def test_reading_needs_no_tensorflow(tmp_path):
    out = B.build_arrayrecord({"train": [QARecord("q", "d", ("a",))]}, tmp_path)
    code = (
        "import sys; from memagent_jax.data.tfds_builder import open_arrayrecord; "
        f"r = open_arrayrecord({str(out)!r}, 'train'); assert r[0].question == 'q'; "
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
