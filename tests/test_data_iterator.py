"""Tests of the host-sharded, restorable iterator (memagent_jax.data.iterator)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from memagent_jax.data import formats as F
from memagent_jax.data.iterator import ShardedIterator


def test_hosts_partition_each_epoch():
    source = list(range(103))
    hosts = [ShardedIterator(source, 5, seed=1, process_index=p, process_count=4) for p in range(4)]
    assert all(h.steps_per_epoch == 5 for h in hosts)  # 103 // 4 = 25 per host -> 5 batches
    seen = [sum((next(h) for _ in range(5)), []) for h in hosts]
    flat = sum(seen, [])
    assert len(flat) == len(set(flat)) == 100  # disjoint, 3 records cut so hosts stay equal
    # the next epoch is a different permutation
    second = [sum((next(h) for _ in range(5)), []) for h in hosts]
    assert second != seen and len(set(sum(second, []))) == 100


def test_order_matches_documented_permutation():
    it = ShardedIterator(list(range(10)), 2, seed=3, process_index=1, process_count=2)
    perm = np.random.default_rng([3, 0]).permutation(10)
    assert sum((next(it) for _ in range(2)), []) == perm[1::2][:4].tolist()


def test_no_shuffle_and_remainder():
    it = ShardedIterator(list(range(7)), 3, shuffle=False, drop_remainder=False, num_epochs=1)
    assert list(it) == [[0, 1, 2], [3, 4, 5], [6]]
    it = ShardedIterator(list(range(7)), 3, shuffle=False, num_epochs=2)
    assert list(it) == [[0, 1, 2], [3, 4, 5], [0, 1, 2], [3, 4, 5]]


def test_restore_in_process_and_validation():
    source = list(range(50))
    a = ShardedIterator(source, 4, seed=9, transform=lambda x: x * 10)
    for _ in range(17):  # crosses an epoch boundary (12 batches per epoch)
        next(a)
    state = json.loads(json.dumps(a.get_state()))
    expected = [next(a) for _ in range(10)]
    b = ShardedIterator(source, 4, seed=9, transform=lambda x: x * 10)
    b.set_state(state)
    assert [next(b) for _ in range(10)] == expected
    with pytest.raises(ValueError, match="seed"):
        ShardedIterator(source, 4, seed=10).set_state(state)
    with pytest.raises(ValueError, match="num_records"):
        ShardedIterator(source[:-1], 4, seed=9).set_state(state)


def test_too_few_records():
    with pytest.raises(ValueError, match="no full batch"):
        ShardedIterator([1, 2, 3], 2, process_count=2)


_CHILD = textwrap.dedent(
    """
    import json, sys
    from memagent_jax.data.formats import open_file
    from memagent_jax.data.iterator import ShardedIterator
    path, host, state_file, out_file, mode = sys.argv[1:6]
    it = ShardedIterator(open_file(path), 3, seed=42, process_index=int(host), process_count=2)
    out = []
    if mode == "save":
        for _ in range(5):
            next(it)
        open(state_file, "w").write(it.state_json())
    else:
        it.restore_json(open(state_file).read())
    for _ in range(6):
        out.append([r.question for r in next(it)])
    json.dump(out, open(out_file, "w"))
    """
)


def test_restore_in_new_process(tmp_path):
    rows = [{"context": f"doc {i}", "input": f"q{i}", "answers": [str(i)], "index": i} for i in range(40)]
    path = tmp_path / "eval.jsonl"
    F.write_eval_file(rows, path)
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for host in ("0", "1"):
        state, saved, restored = tmp_path / f"state{host}.json", tmp_path / f"a{host}.json", tmp_path / f"b{host}.json"
        subprocess.run(
            [sys.executable, str(script), str(path), host, str(state), str(saved), "save"], check=True, env=env
        )
        subprocess.run(
            [sys.executable, str(script), str(path), host, str(state), str(restored), "load"], check=True, env=env
        )
        after_save = json.loads(saved.read_text())
        assert json.loads(restored.read_text()) == after_save
        assert len(after_save) == 6 and all(len(b) == 3 for b in after_save)
    # the saved state does not depend on the host
    assert json.loads((tmp_path / "state0.json").read_text()) == json.loads((tmp_path / "state1.json").read_text())
