"""From token deltas to text deltas: one completion's thinking / marker / solution text as it grows,
and stop strings found in its solution text.

Text grows incrementally: each new stretch of tokens is decoded together with the stretch before
it, and the difference is the new text (vLLM's prefix / read offsets), so a completion of L tokens
costs O(L) decoding rather than O(L^2); a character still split across tokens is held back until
complete. While a completion thinks, its last `len(marker) - 1` tokens are held back: they may be
the start of the end-of-thinking marker, which is not thinking. While a stop string may still be
completing at the end of the solution, that tail is held back too (as vLLM does), so streamed text
never has to be taken back. The final text of a finished completion is decoded whole, as `LLM`
decodes it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..engine.loop import CompletionDelta

_SPLIT_CHAR = "\ufffd"  # what a decoder gives for a character whose bytes are not all there yet


@dataclass
class TextDelta:
    reasoning: str = ""
    marker: str = ""  # the end-of-thinking marker's text, once
    content: str = ""


class _Detokenizer:
    """The text of a growing list of token ids, decoded a stretch at a time."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.text = ""  # text of ids[:read]
        self.prefix = 0  # ids[prefix:read]: the stretch decoded last, context for the next one
        self.read = 0

    def extend(self, ids: list[int]) -> None:
        if not ids:
            return
        self.ids += ids
        before = self.decode(self.ids[self.prefix:self.read])
        after = self.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith(_SPLIT_CHAR):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)

    def full(self) -> str:
        """All the text, a character still split across tokens included."""
        if self.read == len(self.ids):
            return self.text
        before = self.decode(self.ids[self.prefix:self.read])
        return self.text + self.decode(self.ids[self.prefix:])[len(before):]


class CompletionText:
    """Accumulates one completion's deltas; `feed` returns the new text (when `stream`)."""

    def __init__(self, decode: Callable[[list[int]], str], thinks: bool, stop: Sequence[str] = (),
                 stream: bool = True, keep_stop: bool = False):
        self.decode = decode
        self.thinks = thinks  # the request has a thinking budget: tokens before the marker are reasoning
        self.stop = tuple(s for s in stop if s)
        self.keep_stop = keep_stop  # the text keeps the stop string that ended it (SGLang's no_stop_trim)
        self.matched: str | None = None  # the stop string that ended it
        self.stream = stream  # text is wanted as it grows (else only at the end)
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.forced_mask: list[int] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []  # with SamplingParams.logprobs
        self.confidences: list[float] = []  # each token's (core/confidence.py)
        self.last: CompletionDelta | None = None
        # what the engine says once: the prompt's logprobs (when asked) and the prefix-cache hit
        self.prompt_logprobs: list | None = None
        self.prompt_top_logprobs: list | None = None
        self.cached_tokens = 0
        self.kept: int | None = None  # tokens kept when a stop string ended the completion
        self.content_start: int | None = None  # token index where the solution starts, once known
        self._reasoning = _Detokenizer(decode)
        self._content = _Detokenizer(decode)
        self._cut: int | None = None  # where the stop string starts in the solution text
        self._sent = TextDelta()  # text sent so far
        self._marker_sent = False

    @property
    def stopped(self) -> bool:
        return self.kept is not None

    @property
    def finish_reason(self) -> str | None:
        if self.stopped:
            return "stop"
        return self.last.finish_reason if self.last is not None else None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def weight_version(self) -> str | None:
        """The weights the last token came from."""
        versions = self.last.weight_versions if self.last is not None else ()
        return versions[-1][1] if versions else None

    @property
    def weight_versions(self) -> list[list]:
        """Every token's weights: [first token index, version] from each index where they changed (a request
        that spans an in-flight update has two or more)."""
        return [list(v) for v in (self.last.weight_versions if self.last is not None else ())]

    @property
    def output_think(self) -> int:
        """Thinking tokens of the text (a resubmitted rollout's prompt may hold more of the rollout's)."""
        return min(self.last.output_think, len(self.token_ids)) if self.last is not None else 0

    @property
    def think_tokens(self) -> int:
        """The rollout's thinking tokens: the prompt's and the text's."""
        return self.last.think_tokens - self.last.output_think + self.output_think if self.last is not None else 0

    @property
    def solution_tokens(self) -> int:
        """The rollout's solution tokens: the prompt's and the text's (up to a stop string)."""
        if self.last is None:
            return 0
        start = self.content_start if self.content_start is not None else len(self.token_ids)
        return self.last.prompt_solution + max(0, len(self.token_ids) - start)

    def feed(self, delta: CompletionDelta) -> TextDelta:
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs, self.prompt_top_logprobs = delta.prompt_logprobs, delta.prompt_top_logprobs
        self.cached_tokens = max(self.cached_tokens, delta.cached_tokens)
        if self.stopped:  # tokens the engine made before it heard of the stop: dropped
            return TextDelta()
        self.last = delta
        if not self.thinks:
            self.content_start = 0
        elif not delta.thinking:
            self.content_start = min(delta.output_think + delta.output_marker, delta.num_tokens)
        new = len(delta.token_ids)
        if self.stream or self.stop:
            new = self._grow_text(delta)
        self.token_ids += delta.token_ids[:new]
        self.logprobs += delta.logprobs[:new]
        self.forced_mask += delta.forced_mask[:new]
        self.confidences += delta.confidences[:new]
        if delta.top_logprobs is not None:
            self.top_logprobs += delta.top_logprobs[:new]
        if new < len(delta.token_ids) or (self.stop and self._cut is not None):
            self.kept = len(self.token_ids)
        return self._emit() if self.stream else TextDelta()

    def _grow_text(self, delta: CompletionDelta) -> int:
        """Extend the reasoning and solution texts by the delta; returns how many of its tokens are
        kept (fewer when a stop string ends the solution inside it)."""
        ids = self.token_ids + delta.token_ids
        final = delta.finish_reason is not None
        if self.thinks:
            if delta.thinking and not delta.forcing and not final:
                visible = max(0, len(ids) - (delta.marker_len - 1))  # the tail may be the marker's start
            else:
                visible = min(delta.output_think, len(ids))
            self._reasoning.extend(ids[len(self._reasoning.ids):max(visible, len(self._reasoning.ids))])
        if self.content_start is None:
            return len(delta.token_ids)
        pending = ids[self.content_start + len(self._content.ids):]
        if not self.stop:
            self._content.extend(pending)
            return len(delta.token_ids)
        # Stop strings: token by token, so the completion ends at the token that completed one.
        longest = max(len(s) for s in self.stop)
        for token in pending:
            window = max(0, len(self._content.text) - longest)
            self._content.extend([token])
            hits = [(i, s) for i, s in ((self._content.text.find(s, window), s) for s in self.stop) if i >= 0]
            if hits:
                at, self.matched = min(hits)
                self._cut = at + len(self.matched) if self.keep_stop else at
                return self.content_start + len(self._content.ids) - len(self.token_ids)
        return len(delta.token_ids)

    def _emit(self) -> TextDelta:
        out = TextDelta()
        final = self.finished
        reasoning = self._reasoning.full() if final else self._reasoning.text
        out.reasoning = self._take("reasoning", reasoning)
        if self.content_start is None:
            return out
        if self.thinks and not self._marker_sent:
            out.marker = self.decode(self.token_ids[self.output_think:self.content_start])
            self._marker_sent = True
        content = self._content.full() if final else self._content.text
        if self._cut is not None:
            content = content[:self._cut]
        elif not final and self.stop:
            content = content[:len(content) - self._partial_stop(content)]
        out.content = self._take("content", content)
        return out

    def _take(self, part: str, text: str) -> str:
        sent = getattr(self._sent, part)
        if len(text) <= len(sent) or not text.startswith(sent):
            return ""
        setattr(self._sent, part, text)
        return text[len(sent):]

    def _partial_stop(self, content: str) -> int:
        """Length of the longest tail of `content` that begins a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(content)), best, -1):
                if content.endswith(s[:n]):
                    best = n
                    break
        return best

    # -- the finished completion -------------------------------------------------------------

    def full_text(self) -> tuple[str | None, str, str]:
        """(thinking text, or None without a thinking phase; marker text; solution text), each
        decoded whole, the solution cut before a stop string."""
        ids = self.token_ids
        if not self.thinks:
            return None, "", self._cut_at_stop(self.decode(ids))
        start = self.content_start if self.content_start is not None else len(ids)
        think = self.output_think
        return self.decode(ids[:think]), self.decode(ids[think:start]), self._cut_at_stop(self.decode(ids[start:]))

    def _cut_at_stop(self, content: str) -> str:
        if not self.stopped:
            return content
        hits = [(i, s) for i, s in ((content.find(s), s) for s in self.stop) if i >= 0]
        if not hits:
            return content
        at, matched = min(hits)
        return content[: at + len(matched)] if self.keep_stop else content[:at]
