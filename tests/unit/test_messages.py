"""MessageLog, GrowthReport and DeviceState.message (issue #17, finding 8), with no network."""

from __future__ import annotations

import pytest
from manual_clock import Clock

from ptychostream.core.device import DeviceState
from ptychostream.core.messages import GrowthReport, MessageLog, reason_key
from ptychostream.core.pvdb import load_db

UNPOSITIONED = "frame {} waited over 10 s for its position"
MISFIT = "rejected 3 frame(s): frame shape (127, 128) does not fit the model input (128, 128)"
NAN = "rejected 2 frame(s): frame contains NaN or inf"


@pytest.fixture
def clock() -> Clock:
    return Clock(1_700_000_000.0)  # a wall-clock time: the history shows times of day


@pytest.fixture
def device(clock) -> DeviceState:
    d = DeviceState(load_db("reconstructor.db"), message_pv="Message_RBV", refused_pv="RefusedPuts_RBV",
                    history_pv="MessageHistory_RBV")
    d.messages.clock = clock
    return d


def test_numbers_do_not_make_a_new_reason():
    assert reason_key(UNPOSITIONED.format(17)) == reason_key(UNPOSITIONED.format(18))
    assert reason_key("rejected 3 frame(s): x") == reason_key("rejected 1024 frame(s): x")
    assert reason_key(MISFIT) != reason_key(NAN)
    assert reason_key("x", 1) != reason_key("x", 2)  # the same words at another severity are another reason


def test_a_noisy_reason_counts_up_instead_of_pushing_others_out(clock):
    log = MessageLog(size=20, clock=clock)
    log.add(MISFIT, 1, frames=3)
    for uid in range(1, 501):  # one report per unpositioned frame, every 10 ms
        clock.t += 0.01
        log.add(UNPOSITIONED.format(uid), 1, frames=1)
    entries = log.entries()
    assert [e.text for e in entries] == [UNPOSITIONED.format(500), MISFIT]
    assert (entries[0].count, entries[0].frames) == (500, 500)
    assert (entries[1].count, entries[1].frames) == (1, 3)
    assert entries[0].last - entries[0].first == pytest.approx(4.99)


def test_the_history_keeps_the_last_n_distinct_reasons(clock):
    log = MessageLog(size=3, clock=clock)
    for word in ("alpha", "beta", "gamma", "delta", "beta"):
        clock.t += 1
        log.add(f"reason {word}")
    assert [e.text for e in log.entries()] == ["reason beta", "reason delta", "reason gamma"]
    assert log.counts()[reason_key("reason beta")] == (2, 0)
    assert log.counts()[reason_key("reason alpha")] == (1, 0)  # out of the history, still counted


def test_keep_bounds_the_reasons_counted(clock):
    log = MessageLog(size=2, keep=3, clock=clock)
    for word in ("a", "b", "c", "d"):
        log.add(f"reason {word}")
    assert set(log.counts()) == {reason_key(f"reason {w}") for w in "bcd"}


def test_message_pv_shows_new_reasons_at_once_and_rate_limits_repeats(device, clock):
    d = device
    d.message(UNPOSITIONED.format(1), 1)
    assert d.get("Message_RBV") == UNPOSITIONED.format(1)
    clock.t += 0.1
    d.message(UNPOSITIONED.format(2), 1)  # the message already up, with fresher numbers
    assert d.get("Message_RBV") == UNPOSITIONED.format(2)
    clock.t += 0.1
    d.message(MISFIT, 1, frames=3)  # a new reason: shown at once
    assert d.get("Message_RBV") == MISFIT
    for uid in range(3, 12):  # the noisy one repeats: it must not hide the reject for hold_s
        clock.t += 0.1
        d.message(UNPOSITIONED.format(uid), 1)
        assert d.get("Message_RBV") == MISFIT, uid
    clock.t += 0.15  # the reject has been up for hold_s: the next repeat may show
    d.message(UNPOSITIONED.format(12), 1)
    assert d.get("Message_RBV") == UNPOSITIONED.format(12)
    e = d.messages.find(UNPOSITIONED.format(0), 1)
    assert e is not None and e.count == 12 and e.text == UNPOSITIONED.format(12)


def test_a_held_back_repeat_shows_when_its_turn_comes_unless_news_came(device, clock):
    d = device
    d.message(NAN, 1, frames=2)
    clock.t += 0.1
    d.message("model m gives NaN or inf on 1 of its last 1 frames", 2)  # new: shown
    clock.t += 0.1
    d.message(NAN.replace("2 frame", "64 frame"), 1, frames=64)  # a repeat: held back
    d.publish_messages()
    assert d.get("Message_RBV").startswith("model m gives")
    clock.t += 0.9  # the MAJOR one has been up for hold_s: the repeat's latest text now shows
    d.publish_messages()
    assert d.get("Message_RBV") == NAN.replace("2 frame", "64 frame")
    assert d.reading("Message_RBV").severity == 1
    clock.t += 0.1
    d.message(UNPOSITIONED.format(1), 1)
    clock.t += 0.1
    d.message(NAN, 1, frames=2)  # held back ...
    clock.t += 0.1
    d.message(MISFIT, 1, frames=3)  # ... and overtaken by news: never shown over it
    clock.t += 2
    d.publish_messages()
    assert d.get("Message_RBV") == MISFIT


def test_a_batch_with_misfit_and_nan_frames_keeps_both_reasons(device, clock):
    """pipeline/batcher.py calls on_reject once per reason: both stay visible in the history."""
    d = device
    d.message(MISFIT, 1, frames=3)
    d.message(NAN, 1, frames=2)
    assert d.get("Message_RBV") == NAN
    d.publish_messages()
    lines = d.get("MessageHistory_RBV").split("\n")
    assert len(lines) == 2 and lines[0].endswith(": " + NAN) and lines[1].endswith(": " + MISFIT)
    assert "MINOR (2 frames)" in lines[0] and "MINOR (3 frames)" in lines[1]


def test_routine_reports_do_not_hide_a_fresh_message(device, clock):
    d = device
    d.message(NAN, 1, frames=2)
    clock.t += 0.2
    d.message("5 frame(s) dropped (BacklogPolicy DropOldest, queue full at 10) in the last 0.1 s", 1,
              frames=5, routine=True)
    assert d.get("Message_RBV") == NAN  # the drop report is in the history, not over the reject
    assert d.messages.entries()[0].text.startswith("5 frame(s) dropped")
    clock.t += 1.0
    d.message("7 frame(s) dropped (BacklogPolicy DropOldest, queue full at 10) in the last 1.0 s", 1,
              frames=7, routine=True)
    assert d.get("Message_RBV").startswith("7 frame(s) dropped")
    assert d.messages.entries()[0].frames == 12


def test_refused_puts_go_through_the_log(device):
    d = device
    with pytest.raises(ValueError):
        d.put("BatchSize", 0)
    assert d.get("Message_RBV").startswith("put refused: BatchSize: 0 outside the limits")
    assert d.get("RefusedPuts_RBV") == 1
    assert d.messages.entries()[0].text == d.get("Message_RBV")


def test_the_history_fits_its_pv_and_is_republished_only_on_change(device, clock):
    d = device
    for i in range(40):
        clock.t += 2
        d.message(f"reason {chr(65 + i % 26)}{i // 26} " + "é" * 400, 2)  # long lines, 2-byte characters
    d.publish_messages()
    text = d.get("MessageHistory_RBV")
    limit = d.db["MessageHistory_RBV"].max_length - 1
    assert len(text.encode("utf-8")) <= limit
    lines = text.split("\n")
    assert 10 <= len(lines) <= 20 and all("MAJOR" in line and line.endswith("...") for line in lines)
    assert "reason N1" in lines[0]  # newest first, oldest whole lines left out
    posted: list[str] = []
    d.subscribe(lambda spec, r: posted.append(spec.suffix))
    d.publish_messages()
    assert "MessageHistory_RBV" not in posted


def test_growth_report_tells_each_counter_at_most_once_a_period():
    g = GrowthReport(period=1.0)
    assert g.check("dropped", 0, now=0.0) is None
    assert g.check("dropped", 0, now=0.1) is None
    assert g.check("dropped", 5, now=0.2) == (5, pytest.approx(0.1))  # grew since the quiet check at 0.1
    assert g.check("dropped", 9, now=0.5) is None  # told 0.3 s ago
    assert g.check("dropped", 12, now=1.3) == (7, pytest.approx(1.1))
    assert g.check("dropped", 12, now=2.0) is None
    assert g.check("dropped", 0, now=2.1) is None  # a reset: followed from 0
    assert g.check("dropped", 3, now=2.5) == (3, pytest.approx(0.4))
    assert g.check("missed", 2, now=2.5) == (2, 0.0)  # each counter on its own
