"""What wakes a main loop: signals, and notes from other threads.

A Python signal handler runs in the main thread between any two bytecodes, even while that
thread holds a lock (inside ``threading.Event.wait()`` or ``clear()``, say): a handler that
takes a lock, as ``Event.set()`` does, can deadlock the process. So the handler takes none:
it appends the signal's number to a deque and writes a byte to a pipe the main loop waits on
(the self-pipe trick).
"""

from __future__ import annotations

import collections
import os
import select
import signal
from typing import Callable, Iterable


class Inbox:
    """Signals (and notes posted by other threads) for one main loop to take in order."""

    def __init__(self) -> None:
        self._numbers: collections.deque[int] = collections.deque()
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._poll = select.poll()
        self._poll.register(self._read, select.POLLIN)

    def catch(self, numbers: Iterable[int],
              at_once: Callable[[int], None] | None = None) -> None:
        """Install handlers that deliver these signals here. ``at_once`` runs in the handler
        itself, for what cannot wait for the main loop (exiting at once); it must take no lock
        and must not raise (its exception would surface wherever the main thread was)."""
        def handler(number: int, frame: object) -> None:
            if at_once is not None:
                at_once(number)
            self.post(number)

        for number in numbers:
            signal.signal(number, handler)

    def post(self, number: int) -> None:
        """Note ``number`` and wake the loop; safe in a signal handler and from any thread."""
        self._numbers.append(number)
        try:
            os.write(self._write, b"\0")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups the loop has not read yet: it will wake anyway

    def wait(self, timeout: float) -> list[int]:
        """Wait up to ``timeout`` seconds for something to arrive; what arrived, oldest first.
        One thread waits (the main loop's)."""
        if not self._numbers:
            self._poll.poll(timeout * 1000)
        try:
            while os.read(self._read, 4096):
                pass
        except BlockingIOError:
            pass
        taken: list[int] = []
        while self._numbers:
            taken.append(self._numbers.popleft())
        return taken
