"""The pause between tries that the encoder, the recorder and each push
keep (their own tests show it in their log lines and retries)."""

from pistreaming.backoff import Backoff


def test_the_pause_doubles_up_to_its_most_and_starts_over_after_a_reset():
    b = Backoff(1, 30)
    assert [b.next() for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    b.reset()
    assert b.next() == 1


def test_delay_is_what_the_next_try_will_wait():
    b = Backoff(0.25, 8)
    assert b.delay == 0.25
    assert b.next() == 0.25
    assert b.delay == 0.5
