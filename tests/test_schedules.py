"""Pipeline schedules as global action lists: validated for all p ≤ 8, v ≤ 4, m ≤ 16."""
import pytest

from ptdp_compiler.errors import ConfigError
from ptdp_compiler.planner.play import bubble_fraction, play, validate
from ptdp_compiler.schedules import (SCHEDULE_NAMES, build_schedule, expected_peak_inflight,
                                     sends_input_grad, weight_grad_slots)


def _configs():
    for name in SCHEDULE_NAMES:
        for p in range(1, 9):
            for v in range(1, 5):
                if name == "1f1b" and v > 1 or (v > 1 and p == 1):
                    continue
                for m in range(1, 17):
                    if name == "interleaved" and v > 1 and m % p:
                        continue
                    yield name, p, v, m


def test_all_schedules_valid_no_deadlock():
    n = 0
    for name, p, v, m in _configs():
        res = validate(build_schedule(name, p, v, m))
        if name != "gpipe" and v == 1:
            assert res.peak_inflight[0] == min(p, m) and max(res.peak_inflight) <= p
        n += 1
    assert n > 700


@pytest.mark.parametrize("p,v,m", [(2, 2, 3), (4, 2, 6), (8, 4, 12)])
def test_interleaved_needs_m_multiple_of_p(p, v, m):
    with pytest.raises(ConfigError, match="multiple"):
        build_schedule("interleaved", p, v, m)


def test_v_without_pipeline_refused():
    with pytest.raises(ConfigError):
        build_schedule("interleaved", 1, 2, 4)


@pytest.mark.parametrize("name,p,v,m", [("1f1b", 4, 1, 8), ("1f1b", 8, 1, 16), ("gpipe", 4, 1, 8),
                                        ("interleaved", 4, 2, 8), ("interleaved", 4, 4, 8),
                                        ("interleaved", 8, 4, 16), ("interleaved", 2, 2, 4)])
def test_bubble_equals_formula(name, p, v, m):
    """Equal chunks, t_b = 2 t_f, no p2p cost: bubble = (p−1)/(v·m) exactly."""
    res = play(build_schedule(name, p, v, m), lambda a: (1.0 if a.kind == "F" else 2.0) / v)
    assert bubble_fraction(res, m * 3.0) == pytest.approx((p - 1) / (v * m), abs=1e-12)


def test_interleaved_memory_bound():
    p, v, m = 4, 2, 8
    res = validate(build_schedule("interleaved", p, v, m))
    # rank 0 holds 2(p−1)+(v−1)p+1 chunk-microbatches: p·(1 + (p−1)/(p·v)) stages' worth
    assert res.peak_inflight[0] == expected_peak_inflight("interleaved", p, v, m, 0) == 11
    assert res.peak_inflight[0] / v == pytest.approx(p * (1 + (p - 1) / (p * v)))


def test_sends_and_recvs_pair_with_unique_tags():
    s = build_schedule("interleaved", 4, 2, 8)
    sends = {(r, a.peer, a.tag) for r, st in enumerate(s.steps) for g in st for a in g
             if a.kind.startswith("SEND")}
    recvs = {(a.peer, r, a.tag) for r, st in enumerate(s.steps) for g in st for a in g
             if a.kind.startswith("RECV")}
    assert sends == recvs and len(sends) == 2 * 8 * (4 * 2 - 1)


@pytest.mark.parametrize("name,p,v,m", [("1f1b", 2, 1, 4), ("1f1b", 4, 1, 8),
                                        ("interleaved", 2, 2, 4), ("interleaved", 4, 2, 8),
                                        ("gpipe", 2, 1, 4), ("gpipe", 4, 1, 8),
                                        ("interleaved", 8, 4, 64)])
def test_weight_grad_slots_follow_their_backward_and_bound_the_queue(name, p, v, m):
    """A deferred W runs only after its backward, never more than the bound wait past a
    compute step, and every W is placed (the rest after the last step)."""
    sched = build_schedule(name, p, v, m)
    slots = weight_grad_slots(sched, max_pending=1)
    for r in range(p):
        order = sched.compute_order(r)
        assert len(slots[r]) == len(order)
        queued = 0
        for n, a in zip(slots[r], order):
            assert n <= queued, f"rank {r}: W placed before its backward at {a}"
            queued -= n
            assert queued <= 1, f"rank {r}: {queued} backwards' W queued at {a}"
            if a.kind == "B" and a.chunk > 0:
                queued += 1
        n_split = sum(1 for a in order if a.kind == "B" and a.chunk > 0)
        assert sum(slots[r]) <= n_split


def test_weight_grad_slots_fill_the_1f1b_bubble_of_the_last_stage():
    """1F1B, p=2, m=4: the last stage's W of microbatch k runs while it waits for the
    activation of microbatch k+2; the last two run at the end, beside stage 0's backward."""
    sched = build_schedule("1f1b", 2, 1, 4)
    slots = weight_grad_slots(sched)
    assert slots[0] == [0] * 8                       # chunk 0 does not split its backward
    order = [f"{a.kind}{a.mb}" for a in sched.compute_order(1)]
    assert order == ["F0", "B0", "F1", "B1", "F2", "B2", "F3", "B3"]
    assert slots[1] == [0, 0, 0, 0, 1, 0, 1, 0]      # W0 before F2, W1 before F3


@pytest.mark.parametrize("name,p,v,m", [("1f1b", 4, 1, 8), ("interleaved", 4, 2, 8),
                                        ("gpipe", 2, 1, 4)])
def test_play_of_the_split_backward_keeps_the_work_and_shortens_the_step(name, p, v, m):
    """With weight gradients deferred, every rank does the same work (busy time), each
    split backward's W runs once and after its D, and the step gets shorter."""
    sched = build_schedule(name, p, v, m)

    def cost(a):
        return 1.0 if a.kind == "F" else 2.0
    whole = play(sched, cost)
    split = play(sched, cost, weight_grad_cost=lambda c: 1.0)
    assert split.busy == whole.busy
    assert split.makespan < whole.makespan
    for r in range(p):
        evs = [e for e in split.events if e.rank == r]
        d_end = {(a.chunk, a.mb): e.end for e in evs for a in e.actions[:1] if a.kind == "B"}
        ws = [(a.chunk, a.mb, e.start) for e in evs for a in e.actions[:1] if a.kind == "W"]
        split_b = [k for k in d_end if sends_input_grad(sched, k[0])]
        assert sorted((c, mb) for c, mb, _ in ws) == sorted(split_b)
        assert all(start >= d_end[(c, mb)] for c, mb, start in ws)
