"""MetricsWriter: JSONL + TensorBoard + console line, process 0 only."""

import io
import json
import math
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest

from memagent_jax.rl.metrics import MetricsWriter, format_progress


def test_writes_jsonl_tensorboard_and_console(tmp_path):
    out = io.StringIO()
    with MetricsWriter(tmp_path, stream=out, total_steps=10) as writer:
        writer.write(1, {"loss": jnp.float32(0.25), "reward_mean": np.float64(0.5), "grad_norm": 3, "kl": float("nan")})
        writer.write(2, {"loss": 0.125, "reward_mean": 0.75})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["loss"] == 0.25 and records[0]["grad_norm"] == 3.0 and math.isnan(records[0]["kl"])
    assert records[1]["reward_mean"] == 0.75 and "time" in records[1]
    events = [f for f in os.listdir(tmp_path / "tensorboard") if f.startswith("events.out.tfevents")]
    assert events and os.path.getsize(tmp_path / "tensorboard" / events[0]) > 0
    console = out.getvalue().splitlines()
    assert re.match(r"step 1/10 \[\d\d:\d\d<\d\d:\d\d\] \| reward_mean 0.5000 \| loss 0.2500", console[0])
    assert re.match(r"step 2/10 \[\d\d:\d\d<\d\d:\d\d\] \| reward_mean 0.7500", console[1])
    # Every metric is printed (no cap), with the elapsed time and the time left at the measured pace.
    line = format_progress(5, {f"m{i:02d}": float(i) for i in range(15)}, total_steps=10, elapsed_s=50.0, done_steps=5)
    assert line.startswith("step 5/10 [00:50<00:50] | m00 0") and "m14 14" in line

    # A resumed run appends to the same file.
    with MetricsWriter(tmp_path, stream=io.StringIO(), tensorboard=False) as writer:
        writer.write(3, {"loss": 0.0})
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


def test_only_process_zero_writes(tmp_path):
    out = io.StringIO()
    with MetricsWriter(tmp_path / "w", process_index=1, stream=out) as writer:
        writer.write(1, {"loss": 1.0})
    assert not (tmp_path / "w").exists() and out.getvalue() == ""


def test_rejects_non_scalars(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False, console=False) as writer:
        with pytest.raises(ValueError, match="'hist' is not a scalar"):
            writer.write(1, {"hist": np.zeros(3)})


def test_format_progress():
    line = format_progress(7, {"zeta": 2.0, "loss": 1e-5, "tokens_per_s": 12345.6, "kl": 0.00123})
    assert line == "step 7 | loss 1.000e-05 | kl 0.0012 | tokens_per_s 12346 | zeta 2"
