"""A main loop's inbox: signals taken in without a lock, and notes from other threads."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from ingestd.inbox import Inbox


def test_a_signal_reaches_the_waiting_loop_at_once():
    inbox = Inbox()
    seen_in_handler: list[int] = []
    previous = signal.getsignal(signal.SIGUSR2)
    try:
        inbox.catch([signal.SIGUSR2], at_once=seen_in_handler.append)
        threading.Timer(0.1, os.kill, args=(os.getpid(), signal.SIGUSR2)).start()
        started = time.monotonic()
        assert inbox.wait(30) == [signal.SIGUSR2]
        assert time.monotonic() - started < 10
        assert seen_in_handler == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_the_handler_takes_no_lock():
    """A handler runs wherever the main thread was, maybe inside a lock (Event.wait() holds
    one): it must take none, or it could wait for its own thread forever."""
    inbox = Inbox()
    lock_types = (type(threading.Lock()), type(threading.RLock()))
    locked: list[str] = []

    def watch(frame, event, arg) -> None:
        if event == "c_call" and isinstance(getattr(arg, "__self__", None), lock_types):
            locked.append(arg.__name__)

    previous = signal.getsignal(signal.SIGUSR2)
    try:
        inbox.catch([signal.SIGUSR2])
        sys.setprofile(watch)
        try:
            os.kill(os.getpid(), signal.SIGUSR2)
            taken = inbox.wait(0)  # the handler has run by the time a function is entered
        finally:
            sys.setprofile(None)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert taken == [signal.SIGUSR2]
    assert locked == []


def test_notes_from_another_thread_wake_the_loop_in_order():
    inbox = Inbox()

    def post_both() -> None:
        inbox.post(1)
        inbox.post(2)

    threading.Timer(0.1, post_both).start()
    taken: list[int] = []
    deadline = time.monotonic() + 30
    while len(taken) < 2 and time.monotonic() < deadline:
        taken += inbox.wait(30)
    assert taken == [1, 2]


def test_nothing_arrived_means_an_empty_list_after_the_timeout():
    inbox = Inbox()
    started = time.monotonic()
    assert inbox.wait(0.05) == []
    assert time.monotonic() - started >= 0.04


def test_more_wake_ups_than_the_pipe_holds_lose_no_note():
    """A full pipe must not block or fail the poster (a signal handler cannot wait)."""
    inbox = Inbox()
    for number in range(100_000):
        inbox.post(number)
    assert inbox.wait(0) == list(range(100_000))
    assert inbox.wait(0) == []
