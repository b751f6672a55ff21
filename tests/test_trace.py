"""jax_ddl.trace: the timeline of calls (one event per call per device) and its outputs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import int_valued, mesh_of
from jax.sharding import PartitionSpec as P

import jax_ddl
from jax_ddl import _ddl

N = 8
BIG = 64 * 1024  # float32 elements per device: the large-message path


def _spmd(fn):
    return jax.jit(jax.shard_map(fn, mesh=mesh_of((N,), ("i",)), in_specs=P("i"), out_specs=P()))


def test_every_call_on_every_device_is_recorded_with_its_times_and_bytes(tmp_path):
    f = _spmd(lambda v: (jax_ddl.psum(v, "i"), jax_ddl.psum(v[:100] * 2, "i")))
    x = int_valued((N * BIG,), jnp.float32, seed=4)
    jax.block_until_ready(f(x))
    with jax_ddl.trace() as t:
        for i in range(2):
            with t.span(f"step {i}"):
                big, small = f(x)
                jax.block_until_ready((big, small))
    rows = np.asarray(x).reshape(N, -1)
    np.testing.assert_array_equal(np.asarray(big), rows.sum(0))
    np.testing.assert_array_equal(np.asarray(small), (rows[:, :100] * 2).sum(0))

    assert len(t.events) == 2 * 2 * N and t.dropped == 0
    sites = sorted({e.site for e in t.events})
    assert len(sites) == 2 and all(s.startswith("jax_ddl allreduce (call ") for s in sites)
    for sp in t.spans:
        evs = t.in_span(sp)
        assert len(evs) == 2 * N
        assert sorted(e.rank for e in evs) == sorted(list(range(N)) * 2)
        assert sorted(e.bytes for e in evs) == [400] * N + [BIG * 4] * N
        for e in evs:
            assert e.ok
            assert sp.start <= e.start <= e.met <= e.end <= sp.end
            assert 0 <= e.wait <= e.duration
    text = t.summary()
    assert "step 0:" in text and "step 1:" in text
    assert "16 calls on 8 devices" in text

    path = tmp_path / "trace.json"
    t.save(path)
    events = json.loads(path.read_text())["traceEvents"]
    work = [e for e in events if e.get("name") == "allreduce"]
    assert len(work) == 2 * 2 * N
    assert {e["tid"] for e in work} == set(range(N))
    assert [e["name"] for e in events if e.get("tid") == -1 and e["ph"] == "X"] == [
        "step 0",
        "step 1",
    ]
    assert all(e["dur"] >= 0 for e in events if e["ph"] == "X")


def test_a_late_rank_shows_as_every_other_rank_waiting_for_it():
    """Rank 7's call arrives 300 ms late (test fault): every other rank's event waits
    that long for its peers before the reduction starts."""
    f = _spmd(lambda v: jax_ddl.psum(v, "i"))
    x = int_valued((N * BIG,), jnp.float32, seed=5)
    jax.block_until_ready(f(x))
    _ddl.set_fault("delay", 7, 300, 1)
    with jax_ddl.trace() as t:
        out = jax.block_until_ready(f(x))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x).reshape(N, -1).sum(0))
    assert len(t.events) == N
    late = [e for e in t.events if e.rank == 7]
    others = [e for e in t.events if e.rank != 7]
    assert len(late) == 1 and all(e.ok for e in t.events)
    assert all(e.wait >= 0.25 for e in others), [round(e.wait, 3) for e in others]
    assert all(e.end - e.met < 0.25 for e in others)
    assert max(e.met for e in t.events) - min(e.met for e in t.events) < 0.25


def test_nothing_is_recorded_outside_a_trace_and_the_limit_counts_the_rest():
    f = _spmd(lambda v: jax_ddl.psum(v, "i"))
    x = jnp.ones((N * 16,), jnp.float32)
    jax.block_until_ready(f(x))
    assert _ddl.trace_take() == []  # tracing is off by default
    with jax_ddl.trace(limit=3) as t:
        jax.block_until_ready(f(x))
        jax.block_until_ready(f(x))
    assert len(t.events) == 3 and t.dropped == 2 * N - 3
    assert "not recorded (over the limit of 3)" in t.summary()
    jax.block_until_ready(f(x))
    assert _ddl.trace_take() == []


def test_one_trace_at_a_time_and_a_positive_limit():
    with jax_ddl.trace():
        with pytest.raises(RuntimeError, match="already being recorded"):
            with jax_ddl.trace():
                pass
    with pytest.raises(ValueError, match="limit must be at least 1"):
        with jax_ddl.trace(limit=0):
            pass
