"""jax_ddl.model: predictions against hand-computed cases, grid choice, profiles, scenario
projection; topology="auto" against the same grid chosen by hand; the calibration CLI."""

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jax_ddl import model as M
from jax_ddl._src import model as model_src
from jax_ddl._src import project as P

SCENARIOS = Path(__file__).resolve().parent.parent / "docs" / "scenarios"

# Round numbers, so the cases below can be computed by hand.
PROFILE = M.Profile(
    copy_Bps=1e9,
    reduce_Bps={"float32": 1e9, "bfloat16": 0.5e9},
    call_s=0.0,
    barrier_s=0.0,
    links={"host": M.Link(0.0, 1e9), "network": M.Link(0.0, 1e8)},
    faults=[],
)


def test_one_process_flat_reads_and_writes_every_byte_once_per_rank():
    # 4 ranks, flat: each reads its quarter from 4 buffers (S) and writes it into 4 outputs
    # (S): 4 ranks x 2 MB at 1 GB/s.
    p = M.predict(1_000_000, (4,), M.Placement(1, 1, 4), PROFILE)
    assert p["mode"] == "local"
    assert p["time_s"] == pytest.approx(4 * 2e6 / 1e9)
    # 2x2: stage 0 reads S and writes S/2 (scratch), stage 1 reads S/2 and writes S.
    p = M.predict(1_000_000, (2, 2), M.Placement(1, 1, 4), PROFILE)
    assert p["time_s"] == pytest.approx(4 * (1e6 + 0.5e6 + 0.5e6 + 1e6) / 1e9)


def test_one_process_stages_at_the_rate_of_their_kernel_shape():
    # Measured float32 rates by shape: 2 sources into 1 at 2 GB/s, 4 into 1 at 1 GB/s (the
    # dtype rates' reference), into all 4 outputs at 4 GB/s.
    shaped = M.Profile(
        **{
            **PROFILE.__dict__,
            "reduce_shapes": {(2, 1): 2e9, (4, 1): 1e9, (2, 4): 4e9, (4, 4): 3e9},
        }
    )
    assert shaped.stage_rate("float32", 2, 1) == pytest.approx(2e9)
    assert shaped.stage_rate("bfloat16", 2, 1) == pytest.approx(1e9)  # half float32's
    assert shaped.stage_rate("float32", 3, 1) == pytest.approx(1e9)  # nearest in log: 4
    assert shaped.stage_rate("float32", 8, 8) == pytest.approx(3e9)  # several outputs: 4
    assert shaped.stage_rate("float32", 2, 8) == pytest.approx(4e9)
    # The table sets how the rate changes with the shape, reduce_Bps its level: a table
    # measured at half the rate gives the same stage rates.
    half = M.Profile(
        **{**PROFILE.__dict__, "reduce_shapes": {(4, 1): 0.5e9, (2, 1): 1e9, (2, 4): 2e9}}
    )
    assert half.stage_rate("float32", 2, 1) == pytest.approx(2e9)
    assert half.stage_rate("bfloat16", 2, 1) == pytest.approx(1e9)
    assert half.stage_rate("float32", 4, 4) == pytest.approx(4e9)
    # Without the 4-into-1 reference the table is not used.
    noref = M.Profile(**{**PROFILE.__dict__, "reduce_shapes": {(2, 1): 2e9}})
    assert noref.stage_rate("float32", 2, 1) == pytest.approx(1e9)
    assert PROFILE.stage_rate("float32", 2, 4) == pytest.approx(1e9)  # none measured
    # Flat 4: one stage reads S, writes S into the 4 outputs: 4 ranks x 2 MB at 3 GB/s.
    p = M.predict(1_000_000, (4,), M.Placement(1, 1, 4), shaped)
    assert p["time_s"] == pytest.approx(4 * 2e6 / 3e9)
    # 2x2: stage 0 (2 into 1) 1.5 MB at 2 GB/s, stage 1 (2 into 4) 1.5 MB at 4 GB/s.
    p = M.predict(1_000_000, (2, 2), M.Placement(1, 1, 4), shaped)
    assert p["time_s"] == pytest.approx(4 * (1.5e6 / 2e9 + 1.5e6 / 4e9))


def test_hierarchy_across_hosts_hand_computed():
    # 2 hosts x 1 process x 2 devices, grid 2x2, 4 MB per device, one chunk.
    # Local stage: read 4e6, write 2e6 (reduce). Process stage on s = 2e6, part 1e6: frames
    # 2e6 + 4e6 copied, 3e6 reduced; outputs: read s, write S: 6e6 copied.
    # Per rank: 9e6 reduced + 12e6 copied; 2 ranks: 42 ms. Messages: each host sends
    # 2 slots x 1e6 per exchange, reduce-scatter and all-gather, at 1e8 B/s: 40 ms.
    pl = M.Placement(2, 1, 2)
    p = M.predict(4_000_000, (2, 2), pl, PROFILE, chunk_bytes=0)
    assert p["mode"] == "across" and p["chunks"] == 1
    assert p["local_s"] == pytest.approx(0.042)
    assert p["messages_s"] == pytest.approx(0.040)
    assert p["time_s"] == pytest.approx(0.082)
    # In 4 chunks the two overlap: max * 3/4 + sum / 4.
    p = M.predict(4_000_000, (2, 2), pl, PROFILE, chunk_bytes=1_000_000)
    assert p["chunks"] == 4
    assert p["time_s"] == pytest.approx(0.042 * 3 / 4 + 0.082 / 4)


def test_16_bit_hierarchy_sends_float32_between_processes():
    # bfloat16, 2 hosts x 1 x 2, grid 2x2, 4 MB of bfloat16 per device, one chunk. The
    # slice a slot takes across processes is float32 (2x): part 2e6. Reduced: local stage
    # 4e6 read + 4e6 written, process stage 3 x 2e6; copied: frames 6 x 2e6, outputs
    # 4e6 (float32 slice read) + 4e6. Per rank 14e6 at 0.5 GB/s + 20e6 at 1 GB/s, 2 ranks:
    # 96 ms. Messages: 2 slots x 2e6 per host per exchange, twice, at 1e8 B/s: 80 ms.
    p = M.predict(4_000_000, (2, 2), M.Placement(2, 1, 2), PROFILE, dtype="bfloat16", chunk_bytes=0)
    assert p["local_s"] == pytest.approx(0.096)
    assert p["messages_s"] == pytest.approx(0.080)


def test_one_device_per_process_still_copies_into_its_slice():
    # 2 hosts x 1 x 1, grid 2, 1 MB: the local plan is one stage of 1 (a copy of 1e6 read,
    # 1e6 written), the process stage on 1e6 (part 0.5e6: frames 3e6 copied, 1.5e6
    # reduced), the output 1e6 read + 1e6 written: 3.5e6 reduced + 5e6 copied = 8.5 ms.
    # Messages: 0.5e6 per host, twice: 10 ms.
    p = M.predict(1_000_000, (2,), M.Placement(2, 1, 1), PROFILE, chunk_bytes=0)
    assert p["mode"] == "across"
    assert p["local_s"] == pytest.approx(0.0085)
    assert p["messages_s"] == pytest.approx(0.010)


def test_link_bandwidth_follows_the_measured_message_sizes():
    link = M.Link(0.0, 1e9, ((1 << 10, 1e8), (1 << 20, 1e9)))
    assert link.rate(1 << 5) == pytest.approx(1e8)
    assert link.rate(1 << 15) == pytest.approx(0.55e9)  # halfway in log(size)
    assert link.rate(1 << 30) == pytest.approx(1e9)
    assert M.Link(0.0, 2e9).rate(123) == 2e9
    # The exchange's message size picks the rate: 4 MB per device in 4 chunks of the
    # hierarchy sends 0.25 MB messages, twice as slow as whole 1 MB ones on this curve.
    slow_small = M.Profile(
        **{
            **PROFILE.__dict__,
            "links": {
                "host": M.Link(0.0, 1e9),
                "network": M.Link(0.0, 1e8, ((250_000, 0.5e8), (1e6, 1e8))),
            },
        }
    )
    one = M.predict(4_000_000, (2, 2), M.Placement(2, 1, 2), slow_small, chunk_bytes=0)
    four = M.predict(4_000_000, (2, 2), M.Placement(2, 1, 2), slow_small, chunk_bytes=1_000_000)
    assert one["messages_s"] == pytest.approx(0.040)
    assert four["messages_s"] == pytest.approx(0.080)


def test_link_rate_with_more_messages_in_flight_moves_to_the_fan_curve():
    # Ring curve measured with 4 messages per process in flight, the flat pattern's with 16.
    link = M.Link(0.0, 1e8, ((1 << 20, 1e8),), 4, ((1 << 20, 3e8),), 16)
    assert link.rate(1 << 20) == pytest.approx(1e8)  # streams not given: the ring curve
    assert link.rate(1 << 20, 4) == pytest.approx(1e8)
    assert link.rate(1 << 20, 8) == pytest.approx(2e8)  # halfway in log(streams)
    assert link.rate(1 << 20, 16) == pytest.approx(3e8)
    assert link.rate(1 << 20, 64) == pytest.approx(3e8)  # held beyond the fan's count
    # A fan curve not measured with more streams than the ring's is ignored.
    assert M.Link(0.0, 1e8, ((1, 1e8),), 4, ((1, 3e8),), 4).rate(1, 16) == pytest.approx(1e8)


def test_flat_plan_across_hosts_uses_the_fan_curve_the_hierarchy_the_ring():
    # 2 hosts x 1 process x 2 devices. Flat grid 4: each rank sends to the 2 ranks of the
    # other host, 4 messages per process in flight (the fan's count): 4e6 per host per
    # exchange at 2e8, twice: 40 ms (80 ms on the ring curve alone, as in
    # test_flat_spec_across_hosts_hand_computed). The hierarchy 2x2 sends one message per
    # slot, 2 per process (the ring's count): 2e6 per host per exchange at 1e8, twice:
    # 40 ms, as without a fan curve.
    def with_network(link):
        return M.Profile(
            **{**PROFILE.__dict__, "links": {"host": M.Link(0.0, 1e9), "network": link}}
        )

    fan = with_network(M.Link(0.0, 1e8, ((1 << 20, 1e8),), 2, ((1 << 20, 2e8),), 4))
    flat = M.predict(4_000_000, (4,), M.Placement(2, 1, 2), fan)
    assert flat["messages_s"] == pytest.approx(0.040)
    tree = M.predict(4_000_000, (2, 2), M.Placement(2, 1, 2), fan, chunk_bytes=0)
    assert tree["messages_s"] == pytest.approx(0.040)
    # Curves measured with 1 and 2 messages per process: the hierarchy's 2 per process
    # (one per device slot) get the second curve's rate, 20 ms.
    low = with_network(M.Link(0.0, 1e8, ((1 << 20, 1e8),), 1, ((1 << 20, 2e8),), 2))
    tree = M.predict(4_000_000, (2, 2), M.Placement(2, 1, 2), low, chunk_bytes=0)
    assert tree["messages_s"] == pytest.approx(0.020)
    assert model_src._exchange(M.Placement(2, 1, 2), (4,), 0, 1.0)[2] == 4  # per process
    assert model_src._exchange(M.Placement(2, 2, 1), (4,), 0, 1.0)[2] == 2
    # A fan curve without the ring curve's count is not used (nothing to interpolate from).
    unknown = M.Link(0.0, 1e8, ((1 << 20, 1e8),), 0, ((1 << 20, 2e8),), 4)
    assert unknown.rate(1 << 20, 3) == pytest.approx(1e8)


def test_link_latency_grows_with_the_messages_in_flight():
    # 8-byte exchanges measured at 300 us with one message per process and 600 us with the
    # flat pattern's 4: linear in the count between, held at the ends.
    link = M.Link(300e-6, 1e8, fan_streams=4, fan_latency_s=600e-6)
    assert link.latency() == pytest.approx(300e-6)
    assert link.latency(1) == pytest.approx(300e-6)
    assert link.latency(2) == pytest.approx(400e-6)
    assert link.latency(4) == pytest.approx(600e-6)
    assert link.latency(16) == pytest.approx(600e-6)
    assert M.Link(300e-6, 1e8, fan_streams=4).latency(4) == pytest.approx(300e-6)  # unmeasured
    # Flat grid 4 over 2 hosts x 2 single-device processes: each process sends 2 messages
    # to the other host (400 us) and 1 to its mate (host level, 50 us) in one exchange:
    # the latencies add, twice. The hierarchy 2 x 2: one message across (300 us) in one
    # exchange, one to the mate in another.
    prof = M.Profile(
        **{**PROFILE.__dict__, "links": {"host": M.Link(50e-6, 1e15), "network": link}}
    )
    prof.links["network"] = dataclasses.replace(link, bandwidth_Bps=1e15)
    place = M.Placement(2, 2, 1)
    flat = M.predict(8, (4,), place, prof)
    assert flat["messages_s"] == pytest.approx(2 * (400e-6 + 50e-6), abs=1e-9)
    tree = M.predict(8, (2, 2), place, prof)
    assert tree["messages_s"] == pytest.approx(2 * 50e-6 + 2 * 300e-6, abs=1e-9)


def test_one_rank_has_one_grid():
    assert M.candidates(M.Placement(1, 1, 1)) == [(1,)]
    assert M.choose(1 << 20, M.Placement(1, 1, 1), PROFILE) == (1,)


def test_flat_spec_across_hosts_hand_computed():
    # Same placement, flat grid 4: every rank sends 1e6 to each of 3 peers, 2 of them on the
    # other host: 4e6 per host per exchange, twice, at 1e8: 80 ms. Memory per rank, reduce-
    # scatter: 2 remote parts gathered into frames (4e6), 4 parts read (4e6), the result
    # written into its own and its local peer's output (2e6); all-gather: its part into 2
    # frames (4e6), 2 received parts scattered (4e6): 10e6 + 8e6, 2 ranks: 36 ms.
    p = M.predict(4_000_000, (4,), M.Placement(2, 1, 2), PROFILE)
    assert p["mode"] == "spanning"
    assert p["messages_s"] == pytest.approx(0.080)
    assert p["local_s"] == pytest.approx(0.036)
    assert p["time_s"] == pytest.approx(0.116)


def test_latency_and_fixed_terms_add_per_exchange_and_call():
    prof = M.Profile(
        **{
            **PROFILE.__dict__,
            "call_s": 1e-3,
            "links": {"host": M.Link(0.0, 1e9), "network": M.Link(1e-4, 1e8)},
        }
    )
    base = M.predict(4_000_000, (2, 2), M.Placement(2, 1, 2), PROFILE, chunk_bytes=0)
    p = M.predict(4_000_000, (2, 2), M.Placement(2, 1, 2), prof, chunk_bytes=0)
    # One process stage: two exchanges with 100 us latency each, plus the call's 1 ms.
    assert p["time_s"] - base["time_s"] == pytest.approx(1e-3 + 2e-4)


def test_fixed_cost_is_the_measured_small_call_less_what_the_model_charges_it():
    # 2 hosts x 2 single-device processes, default grid 2 x 2: a host stage and a network
    # stage, each two exchanges (latencies 50 and 300 us); arrival and exit barriers (20 us
    # each); links fast enough that 8 bytes add nothing. A measured 8-byte call of 2 ms
    # leaves 2 - 0.1 - 0.6 - 0.04 = 1.26 ms of fixed cost (less the 8 bytes' memory work,
    # under 0.1 us), the model then predicts that call at what was measured, and the flat
    # grid pays both levels' latencies in each of its two exchanges.
    prof = M.Profile(
        **{
            **PROFILE.__dict__,
            "barrier_s": 20e-6,
            "links": {"host": M.Link(50e-6, 1e15), "network": M.Link(300e-6, 1e15)},
        }
    )
    place = M.Placement(2, 2, 1)
    assert M.default_grid(place) == (2, 2)
    fixed = M.fixed_cost(2e-3, place, prof)
    assert fixed == pytest.approx(1.26e-3, abs=1e-7)
    prof.call_s = fixed
    assert M.predict(8, (2, 2), place, prof)["time_s"] == pytest.approx(2e-3, rel=1e-6)
    flat = M.predict(8, (4,), place, prof)["time_s"]
    assert flat == pytest.approx(1.26e-3 + 2 * (300e-6 + 50e-6) + 2 * 20e-6, abs=1e-7)
    assert M.fixed_cost(1e-4, place, prof) == 0.0  # never negative


def test_version_1_profiles_load_with_their_call_made_a_fixed_cost(tmp_path):
    prof = M.Profile(
        **{
            **PROFILE.__dict__,
            "call_s": 2e-3,
            "barrier_s": 20e-6,
            "placement": M.Placement(2, 2, 1),
            "links": {"host": M.Link(50e-6, 1e15), "network": M.Link(300e-6, 1e15)},
        }
    )
    d = prof.to_json()
    assert d["version"] == 2
    path = tmp_path / "v1.json"
    path.write_text(json.dumps({**d, "version": 1}))
    old = M.Profile.load(str(path))
    assert old.call_s == pytest.approx(1.26e-3, abs=1e-7)
    assert old.meta["call_measured_s"] == 2e-3
    path.write_text(json.dumps(d))
    assert M.Profile.load(str(path)).call_s == 2e-3  # version 2 as written
    path.write_text(json.dumps({**d, "version": 3}))
    with pytest.raises(ValueError, match="version 3, expected 1 or 2"):
        M.Profile.load(str(path))


def test_page_faults_out_of_place_interpolate_in_log_size():
    prof = M.Profile(**{**PROFILE.__dict__, "faults": [(1 << 20, 1e-9), (4 << 20, 3e-9)]})
    assert prof.fault_s_per_byte(2 << 20) == pytest.approx(2e-9)
    assert prof.fault_s_per_byte(1 << 10) == pytest.approx(1e-9)
    assert prof.fault_s_per_byte(1 << 30) == pytest.approx(3e-9)
    ip = M.predict(4 << 20, (4,), M.Placement(1, 1, 4), prof)
    oop = M.predict(4 << 20, (4,), M.Placement(1, 1, 4), prof, inplace=False)
    assert oop["time_s"] - ip["time_s"] == pytest.approx(4 * (4 << 20) * 3e-9)


def test_16_bit_types_reduce_at_their_own_rate_through_float32_scratch():
    f32 = M.predict(1_000_000, (2, 2), M.Placement(1, 1, 4), PROFILE)
    bf16 = M.predict(1_000_000, (2, 2), M.Placement(1, 1, 4), PROFILE, dtype="bfloat16")
    # Stage 0 reads the bfloat16 inputs and writes float32 partials (2x the bytes); stage 1
    # reads those partials (float32) and writes bfloat16 outputs; at half the rate.
    assert bf16["time_s"] == pytest.approx(4 * (1e6 + 1e6 + 1e6 + 1e6) / 0.5e9)
    assert bf16["time_s"] > f32["time_s"]


def test_mode_follows_the_engine():
    pl = M.Placement(2, 2, 2)
    assert M.mode_of((2, 2, 2), pl) == "across"
    assert M.mode_of((2, 4), pl) == "across"
    assert M.mode_of((4, 2), pl) == "spanning"
    assert M.mode_of((8,), pl) == "spanning"
    assert M.mode_of((8,), M.Placement(2, 4, 1)) == "across"  # one device per process
    assert M.mode_of((2, 4), M.Placement(1, 1, 8)) == "local"


def test_candidates_and_choice():
    pl = M.Placement(2, 1, 4)
    grids = M.candidates(pl)
    assert set(grids) == {(8,), (2, 4), (4, 2), (2, 2, 2)}
    rows = M.explain(16 << 20, pl, PROFILE)
    assert [r["time_s"] for r in rows] == sorted(r["time_s"] for r in rows)
    # Over a slow network the hierarchy wins and the flat spec is last.
    assert rows[0]["dims"] == (4, 2) and rows[-1]["dims"] == (8,)
    assert M.choose(16 << 20, pl, PROFILE) == (4, 2)
    assert sum(r["default"] for r in rows) == 1 and M.default_grid(pl) == (4, 2)
    assert sum(r["chosen"] for r in rows) == 1


def test_auto_leaves_the_default_only_for_a_gain_beyond_the_margin():
    pl = M.Placement(2, 2, 2)
    # Host links as slow as the network: the process stage inside a host costs as much as
    # the one between hosts, so 2x4 (one process stage over all 4 processes) beats the
    # default 2x2x2 (two process stages).
    slow = M.Profile(
        **{**PROFILE.__dict__, "links": {"host": M.Link(0.0, 1e8), "network": M.Link(0.0, 1e8)}}
    )
    rows = M.explain(64 << 20, pl, slow)
    best, default = rows[0], next(r for r in rows if r["default"])
    assert best["dims"] != default["dims"]
    gain = default["time_s"] / best["time_s"] - 1
    assert gain > M.AUTO_MARGIN and M.choose(64 << 20, pl, slow) == best["dims"]
    # A gain within the margin keeps the default grid.
    near = M.Profile(
        **{
            **PROFILE.__dict__,
            "links": {"host": M.Link(0.0, 1e8 * (1 + gain) ** 2), "network": M.Link(0.0, 1e8)},
        }
    )
    rows = M.explain(64 << 20, pl, near)
    best, default = rows[0], next(r for r in rows if r["default"])
    if best["dims"] != default["dims"]:
        assert default["time_s"] <= best["time_s"] * (1 + M.AUTO_MARGIN)
    assert M.choose(64 << 20, pl, near) == (2, 2, 2)
    assert M.default_grid(M.Placement(2, 2, 2)) == (2, 2, 2)
    assert M.default_grid(M.Placement(1, 1, 8)) == (8,)
    many = M.candidates(M.Placement(16, 4, 4), limit=10)
    assert len(many) == 11 and many[-1] == (4, 4, 16)  # the default grid always included


def test_validate_pairs_runs_with_their_profiles_and_reports_errors(tmp_path):
    """--validate FOLDER: bench-TAG.json with profile-TAG.json; errors and the flat/aware
    ratios against the hand-computed predictions above (82 ms aware, 116 ms flat)."""
    prof = M.Profile(**{**PROFILE.__dict__, "placement": M.Placement(2, 1, 2)})
    prof.save(str(tmp_path / "profile-x.json"))
    row = lambda impl, ms: {
        "size": 4_000_000,
        "count": 1_000_000,
        "type": "float32",  # noqa: E731
        "impl": impl,
        "ip": {"time_us": ms * 1e3},
    }
    bench = {
        "settings": {"placement": "2x1x2", "topology": "2x2"},
        "rows": [row("jax_ddl", 100.0), row("ddl-flat", 116.0)],
    }
    (tmp_path / "bench-x-1.json").write_text(json.dumps(bench))
    # A second run whose measured ratio is the predicted one (82 / 116 ms).
    exact = {**bench, "rows": [row("jax_ddl", 82.0), row("ddl-flat", 116.0)]}
    (tmp_path / "bench-x-2.json").write_text(json.dumps(exact))
    out = tmp_path / "v.json"
    r = subprocess.run(
        [sys.executable, "-m", "jax_ddl.model", "--validate", str(tmp_path), "--json", str(out)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    v = json.loads(out.read_text())
    errors = {x["impl"]: x["error"] for x in v["rows"] if x["file"].endswith("bench-x-1.json")}
    assert errors["jax_ddl"] == pytest.approx(0.082 / 0.100 - 1)
    assert errors["ddl-flat"] == pytest.approx(0.0, abs=1e-9)
    ratio, second = v["ratios"]
    assert second["error"] == pytest.approx(0.0, abs=1e-9)
    assert ratio["measured"] == pytest.approx(1.16) and ratio["predicted"] == pytest.approx(
        0.116 / 0.082
    )
    assert "profile-x.json" in r.stdout  # says which profile each run was predicted with
    # 1.41 predicted against 1.16 measured: 22 % off, outside the 20 % target; the second
    # run's exact.
    assert v["ratios_within_target"] == 1 and "of 2, 1 within 20%" in r.stdout
    # A file that is not bench output is named, with what to give instead.
    (tmp_path / "bench-y.json").write_text(json.dumps({"rows": []}))
    r = subprocess.run(
        [sys.executable, "-m", "jax_ddl.model", "--validate", str(tmp_path / "bench-y.json")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "bench-y.json" in r.stderr and "jax_ddl.bench --json" in r.stderr


def test_profile_round_trip_and_bad_profiles(tmp_path):
    path = tmp_path / "p.json"
    prof = M.Profile(
        **{
            **PROFILE.__dict__,
            "faults": [(1 << 20, 1e-9)],
            "placement": M.Placement(2, 1, 4),
            "reduce_shapes": {(2, 1): 2e9, (4, 4): 3e9},
            "links": {
                "host": M.Link(0.0, 1e9),
                "network": M.Link(1e-5, 1e8, ((1 << 20, 1e8),), 4, ((1 << 20, 2e8),), 16, 3e-5),
            },
        }
    )
    prof.save(str(path))
    back = M.Profile.load(str(path))
    assert back.to_json() == prof.to_json()
    assert back.links["network"] == prof.links["network"]  # curves and stream counts too
    assert back.reduce_shapes == prof.reduce_shapes
    d = json.loads(path.read_text())
    del d["links"]
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="not a jax_ddl profile.*jax_ddl.calibrate"):
        M.Profile.load(str(path))
    with pytest.raises(ValueError, match="cannot read the profile"):
        M.Profile.load(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="multiplies to 6"):
        M.predict(8, (2, 3), M.Placement(1, 1, 8), PROFILE)
    with pytest.raises(ValueError, match="HOSTSxPROCESSESxDEVICES"):
        M.Placement.parse("2x4")
    for change, message in (
        (lambda d: d["links"].pop("network"), "links.network is missing"),
        (lambda d: d["links"]["host"].update(bandwidth_Bps=0), "links.host needs bandwidths"),
        (lambda d: d["links"]["network"].update(fan_streams=-1), "links.network .*stream counts"),
        (lambda d: d["links"]["network"].update(fan_latency_s=-1), "links.network .*latencies"),
        (lambda d: d["links"]["network"].update(fan_curve=[[1, 0]]), "links.network needs"),
        (lambda d: d.update(call_s=-1), "call_s, barrier_s"),
        (lambda d: d.update(overlap=2), "overlap must be in"),
        (lambda d: d.update(reduce_shapes=[[0, 1, 1e9]]), "copy and reduction rates"),
        (lambda d: d.update(links=[]), "not a jax_ddl profile"),
    ):
        d = prof.to_json()
        change(d)
        path.write_text(json.dumps(d))
        with pytest.raises(ValueError, match=message):
            M.Profile.load(str(path))


def test_projection_ring_and_hierarchy_against_hand_computed():
    x = {
        "intra_bandwidth_GBps": 10,
        "intra_latency_us": 0,
        "inter_bandwidth_Gbps": 8,  # 1 GB/s
        "inter_latency_us": 0,
        "compute_ms": 100,
        "backward_fraction": 0.5,
        "call_overhead_us": 0,
        "gradient_MB": 100,
        "buckets": 1,
    }
    # 4 hosts x 2 GPUs, hierarchy: 2 steps of 50 MB at 10 GB/s, 6 of 25 MB at 1 GB/s.
    assert P.allreduce_s(x, 8, 2, aware=True) == pytest.approx(2 * 0.005 + 6 * 0.025)
    # Flat ring over 8: 14 steps of 12.5 MB at 1 GB/s.
    assert P.allreduce_s(x, 8, 2, aware=False) == pytest.approx(14 * 0.0125)
    # Without overlap all of it is exposed; with one bucket nothing hides either.
    t = P.allreduce_s(x, 8, 2, aware=True)
    assert P.efficiency(x, 8, 2, True, False) == pytest.approx(0.1 / (0.1 + t))
    assert P.efficiency(x, 8, 2, True, True) == pytest.approx(0.1 / (0.1 + t))
    # With 4 buckets, 50 ms of backward hides up to 50 ms but never the last bucket.
    x4 = {**x, "buckets": 4}
    t4 = P.allreduce_s(x4, 8, 2, aware=True)
    assert P.efficiency(x4, 8, 2, True, True) == pytest.approx(0.1 / (0.1 + max(t4 - 0.05, t4 / 4)))


@pytest.mark.parametrize("name", ["ddl2017", "goyal2017", "horovod2018"])
def test_shipped_scenarios_have_sourced_ranges_and_project(name):
    sc = P.load(str(SCENARIOS / f"{name}.json"))
    rows = P.project(sc)
    for r in rows:
        assert 0 < r["low"] <= r["efficiency"] + 1e-12 <= r["high"] + 2e-12 <= 1 + 2e-12
    # More GPUs never scale better at the nominal inputs (per plan and overlap).
    for plan in ("aware", "flat ring"):
        for overlap in (True, False):
            e = [r["efficiency"] for r in rows if r["plan"] == plan and r["overlap"] == overlap]
            assert all(a >= b - 1e-12 for a, b in itertools_pairwise(e))
    for pub in sc["published"]:
        c = P.compare(sc, rows, pub)
        assert c["low"] <= c["high"]


def itertools_pairwise(xs):
    return list(zip(xs, xs[1:]))


def test_scenario_errors_name_the_field(tmp_path):
    sc = json.loads((SCENARIOS / "ddl2017.json").read_text())
    del sc["inputs"]["compute_ms"]["source"]
    path = tmp_path / "s.json"
    path.write_text(json.dumps(sc))
    with pytest.raises(ValueError, match="inputs.compute_ms has no source"):
        P.load(str(path))
    good = json.loads((SCENARIOS / "ddl2017.json").read_text())
    for change, message in (
        (lambda s: s.update(devices_per_host=0), "devices_per_host must be a positive int"),
        (lambda s: s.update(plan="flat"), "plan must be one of"),
        (lambda s: s.update(inter_algorithm="tree"), "inter_algorithm must be one of"),
        (lambda s: s["inputs"].update(typo={}), "unknown inputs"),
        (lambda s: s["inputs"]["compute_ms"].update(range=[1, 2, 3]), "inputs.compute_ms: nomin"),
        (lambda s: s["inputs"]["compute_ms"].update(nominal=900), "outside its range"),
        (lambda s: s["published"][0].update(gpus=300), "published.0..gpus = 300"),
    ):
        sc = json.loads(json.dumps(good))
        change(sc)
        path.write_text(json.dumps(sc))
        with pytest.raises(ValueError, match=message):
            P.load(str(path))


def test_model_cli_explain_and_scenario(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "jax_ddl.model", "--explain", "16M", "--placement", "2x1x4"],
        capture_output=True,
        text=True,
        check=True,
    )
    chosen = [line.split()[0] for line in r.stdout.splitlines() if "chosen by auto" in line]
    assert chosen == ["4x2"]
    out = tmp_path / "proj.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "jax_ddl.model",
            "--scenario",
            str(SCENARIOS / "goyal2017.json"),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "published 90% at 256 GPUs against 8" in r.stdout
    assert json.loads(out.read_text())[0]["rows"]
    r = subprocess.run(
        [sys.executable, "-m", "jax_ddl.model", "--explain", "16M"],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "--placement" in r.stderr


def test_auto_gives_the_bits_of_the_grid_it_chose(monkeypatch, tmp_path):
    """topology="auto" picks the grid the model predicts fastest for the call's bytes; its
    results are bitwise those of that grid given by hand, and exact sums."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as Ps

    import jax_ddl

    n = jax.device_count()
    prof = M.Profile(**{**PROFILE.__dict__, "barrier_s": 0.0})
    path = tmp_path / "p.json"
    prof.save(str(path))
    monkeypatch.setenv("JAX_DDL_PROFILE", str(path))
    mesh = Mesh(np.array(jax.devices()), ("i",))
    x = jax.random.normal(jax.random.key(0), (n, 3000), jnp.float32)

    def run(topology):
        f = jax.shard_map(
            lambda v: jax_ddl.psum(v, "i", topology=topology),
            mesh=mesh,
            in_specs=Ps("i"),
            out_specs=Ps("i"),
            check_vma=False,
        )
        return np.asarray(jax.jit(f)(x))

    # In one process the flat grid reads and writes least: the model picks it.
    chosen = M.choose(3000 * 4, M.Placement(1, 1, n), prof)
    assert chosen == (n,)
    auto, hand = run("auto"), run("x".join(map(str, chosen)))
    assert np.array_equal(auto, hand)
    np.testing.assert_allclose(auto[0], np.asarray(x).sum(0), rtol=1e-5, atol=1e-5)
    # Whatever grid the model picks is the one that runs: made to pick 2 x n/2, auto gives
    # that grid's bits (its reduction order), not the flat grid's.
    picked = []

    def pick(nbytes, placement, profile, **kw):
        picked.append((nbytes, placement, kw["dtype"], kw["inplace"]))
        return (2, n // 2)

    monkeypatch.setattr(model_src, "choose", pick)
    two = run("x".join(map(str, (2, n // 2))))
    assert not np.array_equal(two, hand)  # the two orders round differently somewhere
    assert np.array_equal(run("auto"), two)
    assert picked[-1] == (3000 * 4, M.Placement(1, 1, n), "float32", True)
    monkeypatch.setenv("JAX_DDL_TOPOLOGY", "auto")
    assert np.array_equal(run(None), two)
    monkeypatch.undo()
    monkeypatch.setenv("JAX_DDL_PROFILE", str(tmp_path / "missing.json"))
    monkeypatch.setenv("JAX_DDL_TOPOLOGY", "auto")
    with pytest.raises(ValueError, match="JAX_DDL_PROFILE: cannot read the profile"):
        run("auto")


def test_explain_lists_what_auto_weighs_for_this_launch(monkeypatch, tmp_path):
    import jax

    import jax_ddl

    n = jax.device_count()
    rows = jax_ddl.explain(1 << 20)
    assert {r["grid"] for r in rows} == {
        "x".join(map(str, d)) for d in M.candidates(M.Placement(1, 1, n))
    }
    assert sum(r["chosen"] for r in rows) == 1 and rows[0]["dims"] == (n,)
    # A profile measured elsewhere is used, with a warning that says so.
    prof = M.Profile(**{**PROFILE.__dict__, "placement": M.Placement(2, 1, 4)})
    prof.save(str(tmp_path / "p.json"))
    monkeypatch.setenv("JAX_DDL_PROFILE", str(tmp_path / "p.json"))
    from jax_ddl._src import topology

    with pytest.warns(UserWarning, match="measured on 2x1x4.*runs on 1x1x8"):
        topology.choose(n, 1 << 20, "float32", True, 0, 16384)


def test_calibration_waits_test_every_pending_request_and_sleep_at_most_the_engine_cap():
    """The link exchange's wait polls as the engine: each pending request tested on its
    own every pass (each MPI_Test drives MPICH's progress once), finished ones never
    again, sleeps doubling from 5 us to POLL_MAX_S only while nothing completes."""
    from jax_ddl._src import calibrate

    class Req:
        def __init__(self, after):
            self.after, self.tests = after, 0

        def Test(self):
            assert self.tests < self.after, "tested again after completing"
            self.tests += 1
            return self.tests == self.after

    reqs = [Req(1), Req(3), Req(12)]
    sleeps = []
    calibrate._wait_like_the_engine(reqs, sleep=sleeps.append)
    assert [r.tests for r in reqs] == [1, 3, 12]  # once per pass until each completed
    # Pass 1 completes the first request, pass 3 the second, pass 12 the last: a sleep
    # after pass 2 (5 us), none after a completion, then 5 us doubling to the cap.
    us = [round(x * 1e6, 3) for x in sleeps]
    assert us == [5, 5, 10, 20, 40, 80, 100, 100, 100]
    assert max(sleeps) == calibrate.POLL_MAX_S


def test_calibrate_cli_one_process(tmp_path):
    out = tmp_path / "profile.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "jax_ddl.calibrate",
            "--devices",
            "4",
            "--out",
            str(out),
            "--fault-sizes",
            "1M,4M",
            "-n",
            "3",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**__import__("os").environ, "XLA_FLAGS": ""},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    prof = M.Profile.load(str(out))
    assert prof.placement == M.Placement(1, 1, 4)
    assert prof.copy_Bps > 1e8 and all(v > 1e7 for v in prof.reduce_Bps.values())
    assert 0 < prof.call_s < 0.1 and [s for s, _ in prof.faults] == [1 << 20, 4 << 20]
    # The fixed cost is the measured 8-byte call less what the model charges it itself.
    measured = prof.meta["call_measured_s"]
    assert prof.call_s <= measured
    small = M.predict(8, M.default_grid(prof.placement), prof.placement, prof)["time_s"]
    assert small == pytest.approx(measured, rel=1e-6) or prof.call_s == 0.0
    assert "reduction bfloat16" in r.stdout and "written to" in r.stdout
    # The stages' kernel shapes: 2 and 4 sources, into 1 or the 4 outputs.
    assert sorted(prof.reduce_shapes) == [(2, 1), (2, 4), (4, 1), (4, 4)]
    assert all(v > 1e7 for v in prof.reduce_shapes.values())
    assert "(2 sources -> 4, <= 4 MiB buffers)" in r.stdout
    # The profile predicts this machine's flat call within reason (sanity, not accuracy).
    p = M.predict(4 << 20, (4,), prof.placement, prof)
    assert 1e-4 < p["time_s"] < 1.0 and math.isfinite(p["time_s"])
