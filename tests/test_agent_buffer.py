"""The agent's bounded send buffer: oldest dropped first, gaps counted once, resends keep sequences,
one report in flight per worker so each worker's reports reach the controller in order."""

import threading

from expertplane.agent.buffer import ReportBuffer
from expertplane.proto import expertplane_pb2 as pb


def _report(rank, seq):
    return pb.LoadReport(node="n0", worker_rank=rank, sequence=seq)


def _send_all(buf, generation):
    """Send and ACK everything like a healthy controller; returns what was sent, in order."""
    out = []
    while (r := buf.take(generation, max_in_flight=100, timeout=0)) is not None:
        out.append(r)
        buf.ack(r.worker_rank, r.sequence)
    return out


def test_full_buffer_drops_oldest_and_counts_gap_on_next_report_of_that_worker():
    buf = ReportBuffer(3)
    for seq in (1, 2, 3):
        assert buf.put(_report(0, seq)) == 0
    assert buf.put(_report(0, 4)) == 1 and buf.put(_report(0, 5)) == 1
    assert buf.dropped_total == 2 and len(buf) == 3
    sent = _send_all(buf, buf.new_generation())
    assert [r.sequence for r in sent] == [3, 4, 5]
    # sequences 1 and 2 were dropped: the oldest survivor of rank 0 carries the count, once
    assert [r.dropped_windows for r in sent] == [2, 0, 0]


def test_gap_of_one_worker_is_not_charged_to_another():
    buf = ReportBuffer(2)
    buf.put(_report(0, 1))
    buf.put(_report(1, 1))
    buf.put(_report(1, 2))          # drops rank 0 seq 1; rank 0 has nothing left waiting
    gen = buf.new_generation()
    assert [(r.worker_rank, r.dropped_windows) for r in _send_all(buf, gen)] == [(1, 0), (1, 0)]
    buf.put(_report(0, 2))          # the next report of rank 0 carries its gap
    assert _send_all(buf, gen)[0].dropped_windows == 1


def test_one_report_in_flight_per_rank_and_ranks_interleave():
    buf = ReportBuffer(8)
    for seq in (1, 2):
        buf.put(_report(0, seq))
        buf.put(_report(1, seq))
    gen = buf.new_generation()
    a = buf.take(gen, 9, timeout=0)
    b = buf.take(gen, 9, timeout=0)
    assert [(a.worker_rank, a.sequence), (b.worker_rank, b.sequence)] == [(0, 1), (1, 1)]
    assert buf.take(gen, 9, timeout=0) is None           # both ranks wait for their ACK
    buf.ack(1, 1)
    assert (buf.take(gen, 9, timeout=0).worker_rank, buf.in_flight) == (1, 2)
    assert buf.take(gen, 1, timeout=0) is None           # global in-flight window of one


def test_when_everything_is_in_flight_the_new_report_is_the_one_dropped():
    buf = ReportBuffer(1)
    buf.put(_report(0, 1))
    gen = buf.new_generation()
    assert buf.take(gen, 1, timeout=0).sequence == 1
    assert buf.put(_report(0, 2)) == 1 and len(buf) == 1
    buf.ack(0, 1)
    buf.put(_report(0, 3))
    assert _send_all(buf, gen)[0].dropped_windows == 1


def test_in_flight_reports_are_not_dropped_and_are_resent_with_the_same_sequence():
    buf = ReportBuffer(3)
    for seq in (1, 2, 3):
        buf.put(_report(0, seq))
    gen = buf.new_generation()
    assert buf.take(gen, max_in_flight=9, timeout=0).sequence == 1
    buf.put(_report(0, 4))           # full: drops seq 2 (oldest not in flight), never seq 1
    gen2 = buf.new_generation()      # the stream broke before the ACK of seq 1
    assert buf.take(gen, max_in_flight=9, timeout=0) is None     # the old stream gets nothing
    assert [(r.sequence, r.dropped_windows) for r in _send_all(buf, gen2)] == [(1, 0), (3, 1), (4, 0)]


def test_overloaded_report_is_resent_later_before_any_newer_one_of_its_rank():
    buf = ReportBuffer(4)
    buf.put(_report(0, 1))
    buf.put(_report(0, 2))
    gen = buf.new_generation()
    assert buf.take(gen, 9, timeout=0).sequence == 1
    buf.retry_later(0, 1, delay=0.2)
    assert buf.take(gen, 9, timeout=0) is None           # seq 2 may not overtake seq 1
    again = buf.take(gen, 9, timeout=2.0)
    assert again.sequence == 1 and buf.overloads(0, 1) == 1
    assert buf.ack(0, 1) and not buf.ack(0, 1)
    assert buf.take(gen, 9, timeout=0).sequence == 2
    assert buf.ack(0, 2) and buf.wait_empty(0)


def test_take_wakes_up_when_a_report_arrives():
    buf = ReportBuffer(4)
    gen = buf.new_generation()
    got = []
    t = threading.Thread(target=lambda: got.append(buf.take(gen, 4, timeout=5.0)))
    t.start()
    buf.put(_report(3, 7))
    t.join(5.0)
    assert got and got[0].sequence == 7
