"""Stop strings on streamed text: cut exactly at the stop, and never leak a partial stop into the stream.

The cost of one `feed` does not grow with the number of stops: a stop that completes must end inside the new
text, so only (end position x distinct stop length) slices of the held tail + new text are looked up in a set,
and the partial stop held back is found by bisecting the sorted stops (is this suffix a prefix of one of them?)
for at most (longest stop - 1) suffixes. Building the matcher sorts the stops once (~20 ms for 50,000): engines
build it off the event loop and off their generation thread.
"""

from __future__ import annotations

from bisect import bisect_left


class StopStringMatcher:
    """Feed text pieces; get back what is safe to emit now. Text that could be the start of a stop is held back."""

    __slots__ = ("_firsts", "_held", "_lasts", "_lengths", "_longest", "_set", "_sorted", "matched", "stopped")

    def __init__(self, stops: list[str]) -> None:
        unique = {s for s in stops if s}
        self._set = frozenset(unique)
        self._sorted = sorted(unique)
        self._lengths = sorted({len(s) for s in unique})
        self._longest = self._lengths[-1] if unique else 0
        self._firsts = frozenset(s[0] for s in unique)
        self._lasts = frozenset(s[-1] for s in unique)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None
        """Once stopped: the stop string that ended the text."""

    def feed(self, text: str) -> str:
        if not self._set:
            return text
        buffer = self._held + text
        cut = self._earliest_stop(buffer, len(self._held))
        if cut >= 0:
            self._held = ""
            self.stopped = True
            return buffer[:cut]
        keep = self._longest_partial_stop(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """The generation ended for another reason: what was held back is plain text after all."""
        held, self._held = self._held, ""
        return held

    def _earliest_stop(self, buffer: str, new_from: int) -> int:
        """The start of the earliest stop in `buffer`, or -1. The held part holds no whole stop, so a stop ends in
        the new text; of all that do, the one that starts first wins (as `min(buffer.find(stop))` would say)."""
        stops, lengths, lasts, longest = self._set, self._lengths, self._lasts, self._longest
        cut, matched = -1, None
        for end in range(new_from + 1, len(buffer) + 1):
            if cut >= 0 and end - longest >= cut:
                break  # nothing ending here or later can start before the stop already found
            if buffer[end - 1] not in lasts:
                continue
            for size in reversed(lengths):  # longest first: it starts earliest
                if size <= end and buffer[end - size : end] in stops:
                    if cut < 0 or end - size < cut:
                        cut, matched = end - size, buffer[end - size : end]
                    break
        if matched is not None:
            self.matched = matched
        return cut

    def _longest_partial_stop(self, buffer: str) -> int:
        """The longest suffix of `buffer` that is a proper prefix of some stop (its length, 0 if none). `buffer`
        holds no whole stop, so a stop that starts with the suffix is longer than it."""
        ordered, firsts = self._sorted, self._firsts
        n = len(buffer)
        for size in range(min(self._longest - 1, n), 0, -1):
            if buffer[n - size] not in firsts:
                continue
            suffix = buffer[n - size :]
            i = bisect_left(ordered, suffix)  # the first stop >= suffix starts with it, if any stop does
            if i < len(ordered) and ordered[i].startswith(suffix):
                return size
        return 0
