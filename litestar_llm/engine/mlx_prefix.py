"""Prompt prefixes prefilled once for every request that shares them: mlx-lm's `LRUPromptCache`, bounded by bytes,
plus the prefixes still being prefilled, so that requests arriving together (or while a shared prefix is still
prefilling) wait for it instead of each prefilling it again.

How a prefix gets shared (all on the generation thread):
- A request whose prompt shares at least `MIN_SHARED_TOKENS` new tokens with another waiting request is inserted
  into BatchGenerator in two segments, the shared part and its own rest (`insert_segments`): BatchGenerator stops
  at the segment's end, and the engine keeps that cache here (`extract_cache`), as mlx_lm.server keeps its system
  prompts. The requests sharing it wait (`waits_for_prefix`) and then prefill only their own suffix.
- Any prompt with at least `MIN_SHARED_TOKENS` new tokens has its cache kept when its prefill ends (as
  mlx_lm.server keeps its user segments), and a request arriving while such a prompt is still being prefilled,
  sharing those tokens, waits for that prefill to end: the kept cache covers the shared part (trimmed on fetch).
- A finished sequence's cache (prompt and answer) is kept too: the next turn of a chat starts from it.

The bound is in bytes (mlx_lm.server's `--prompt-cache-bytes`): the cache plus the KV caches of the sequences
being generated stay within `max_bytes`, the cache giving way (least recently used first).
"""

from __future__ import annotations

import logging
from typing import Any

from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache

logger = logging.getLogger(__name__)

MIN_SHARED_TOKENS = 128
"""Prefix tokens worth making a request wait for another's prefill: less, and prefilling them again costs less than
the step the wait adds (chat templates alone share a header of a few dozen tokens)."""
DEFAULT_MEMORY_SHARE = 0.25
"""With `prompt_cache_bytes` omitted: this share of the memory available at start-up."""


def default_max_bytes() -> int:
    try:
        import psutil

        available = psutil.virtual_memory().available
    except Exception:  # psutil missing or the platform unsupported: POSIX's own count
        import os

        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(available * DEFAULT_MEMORY_SHARE)


def common_prefix(a: list[int], b: list[int]) -> int:
    """The length of the longest common prefix, by bisection over slice comparisons (C speed, not per token)."""
    low, high = 0, min(len(a), len(b))
    if a[:high] == b[:high]:
        return high
    while low < high:  # a[:low] == b[:low] and a[:high] != b[:high]
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


class _Filling:
    """A prompt being prefilled whose cache is kept when its prefill (for a `checkpoint`, its first segment) ends:
    `tokens` from `start` (what it had cached) on are new."""

    __slots__ = ("checkpoint", "start", "tokens")

    def __init__(self, tokens: list[int], start: int, checkpoint: bool) -> None:
        self.tokens, self.start, self.checkpoint = tokens, start, checkpoint


class PrefixCache:
    """Touched by the generation thread only."""

    def __init__(self, key: str, max_bytes: int, max_entries: int) -> None:
        self.key, self.max_bytes, self.max_entries = key, max_bytes, max_entries
        self.enabled = max_bytes > 0 and max_entries > 0
        self._lru = LRUPromptCache(max_size=max_entries, max_bytes=max_bytes)
        self._filling: dict[int, _Filling] = {}  # BatchGenerator uid -> its prompt, while it prefills
        self.lookups = self.hits = self.kept = self.waits = 0

    def stats(self) -> dict[str, Any]:
        return {
            "prompt_cache_bytes": self._lru.nbytes,
            "prompt_cache_max_bytes": self.max_bytes,
            "prompt_cache_entries": len(self._lru),
            "prompt_cache_lookups": self.lookups,
            "prompt_cache_hits": self.hits,
            "prompt_cache_hit_rate": self.hits / self.lookups if self.lookups else 0.0,
            "prompt_cache_kept": self.kept,
            "prefix_waits": self.waits,
        }

    def clear(self) -> None:
        """A new generator: its uids start again, and nothing it held survives."""
        self._lru = LRUPromptCache(max_size=self.max_entries, max_bytes=self.max_bytes)
        self._filling.clear()

    # -- before insertion ------------------------------------------------------------------------------------

    def waits_for_prefix(self, prompt: list[int], running: dict) -> bool:
        """Whether `prompt` should wait: a prompt still being prefilled shares enough new tokens with it."""
        if not self.enabled:
            return False
        for uid, filling in list(self._filling.items()):
            if uid not in running:  # removed before its prefill ended (cancelled, failed)
                del self._filling[uid]
                continue
            head = filling.start + MIN_SHARED_TOKENS
            if len(prompt) > head and prompt[:head] == filling.tokens[:head]:
                self.waits += 1
                return True
        return False

    def fetch(self, prompt: list[int]) -> tuple[list | None, list[int]]:
        """The KV cache of the longest cached prefix of `prompt` (a copy), and the tokens still to prefill (never
        none: the last prompt token must go through the model to give the first logits)."""
        if not self.enabled:
            return None, prompt
        self.lookups += 1
        cache, rest = self._lru.fetch_nearest_cache(self.key, prompt)
        if cache is not None and not rest:
            if not can_trim_prompt_cache(cache):
                return None, prompt
            trim_prompt_cache(cache, 1)
            rest = prompt[-1:]
        if cache is not None:
            self.hits += 1
        return cache, rest

    def segments(self, prompt: list[int], cached: int, waiting: Any) -> list[list[int]]:
        """The prompt's uncached rest as BatchGenerator segments: split where the longest prefix it shares with a
        waiting prompt ends, when that shares enough new tokens, so the cache can be kept there for them."""
        rest = prompt[cached:]
        if not self.enabled:
            return [rest]
        head = cached + MIN_SHARED_TOKENS
        if len(prompt) <= head:
            return [rest]
        shared = max(
            (common_prefix(prompt, other.prompt) for other in waiting if other.prompt[:head] == prompt[:head]),
            default=0,
        )
        shared = min(shared, len(prompt) - 1)
        if shared < head:
            return [rest]
        return [prompt[cached:shared], prompt[shared:]]

    def filling(self, uid: int, prompt: list[int], cached: int, segments: list[list[int]]) -> None:
        """Register an inserted prompt with enough new tokens: its cache is kept when its prefill (its first
        segment, for a split one) ends, and until then prompts sharing those tokens wait for it."""
        if self.enabled and len(prompt) - cached >= MIN_SHARED_TOKENS:
            checkpoint = len(segments) > 1
            tokens = prompt[: cached + len(segments[0])] if checkpoint else prompt
            self._filling[uid] = _Filling(tokens, cached, checkpoint)

    # -- after a generator step ------------------------------------------------------------------------------

    def prefilled(self, generator: Any, responses: list, active_bytes: Any) -> None:
        """Keep the caches of registered prompts whose prefill (a checkpoint's first segment) ended in this step."""
        if not self._filling:
            return
        keep = {}
        for r in responses:
            filling = self._filling.get(r.uid)
            if filling is not None and (r.end_of_prompt or (r.end_of_segment and filling.checkpoint)):
                del self._filling[r.uid]
                keep[r.uid] = "system" if filling.checkpoint else "user"
        if keep:
            for uid, (cache, tokens) in generator.extract_cache(list(keep)).items():
                self.keep(list(tokens), cache, keep[uid], active_bytes)

    def keep(self, tokens: list[int] | None, cache: list | None, kind: str, active_bytes: Any) -> None:
        """Keep `cache` (of `tokens`), then give way to the running sequences' KV caches within `max_bytes`."""
        if not self.enabled or not tokens or not cache:
            return
        try:
            self._lru.insert_cache(self.key, tokens, cache, cache_type=kind)
            self.kept += 1
            self._lru.trim_to(n_bytes=self.max_bytes - active_bytes())
        except Exception:  # an optimisation only: never worth a request
            logger.exception("could not keep a prompt cache for model %s", self.key)
