"""Early exit on confidence, the engine's part (docs/confidence.md): DeepConf's warm-up and consensus, DEER's probes.

The scheduler applies a trace's online stop as its tokens arrive (core/scheduler.py, `_check_confidence`); what
spans the traces of a request, or needs sequences of its own, is here:

- DeepConf warm-up: of the n traces, the first `deepconf_warmup` run alone and whole; the threshold is set from
  their lowest group confidences, then the others start (sharing the prompt's cached blocks) with it.
- DeepConf consensus: once the confidence-weighted vote of the finished traces gives one answer
  `deepconf_consensus` of the weight, the unfinished ones are stopped (DeepConf's early stop of sampling).
- DEER ("Dynamic Early Exit in Reasoning Models", arXiv 2504.15895): when a thinking trace samples a transition
  token (a "Wait"), a probe is forked from the trace just before it: a sequence of its own holding the trace's
  tokens, the end-of-thinking marker and an answer opening, that shares the trace's full KV blocks (only the
  trace's last, partial block and the probe's own tokens are computed) and decodes a short greedy answer. Its
  tokens are never the trace's and count against none of its budgets. If the answer's mean token probability
  reaches `deer_threshold`, the trace is cut back to the transition and its thinking is ended there by the
  forced marker. The trace runs on while its probe decodes (one probe at a time per trace); what it sampled
  past the transition is then dropped and counted as spent.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from elastic_decode.kernels import DONE, FINISH_STOP, THINKING

from ..core import confidence
from ..core.sequence import Sequence, SequenceStatus
from ..sampling_params import SamplingParams
from ..utils.answers import extract_boxed, majority_vote



@dataclass(eq=False)
class RequestExits:
    """A request's early-exit bookkeeping."""

    held: list[Sequence] = field(default_factory=list)  # DeepConf: traces waiting for the warm-up's threshold
    warmup: list[Sequence] = field(default_factory=list)
    threshold: float | None = None
    probes: dict[int, Sequence] = field(default_factory=dict)  # DEER: trace seq_id -> its pending probe
    probe_tokens: int = 0  # tokens the finished probes generated


class EarlyExits:
    def __init__(self, engine):
        self.engine = engine

    @property
    def scheduler(self):
        return self.engine.scheduler

    # -- requests ------------------------------------------------------------------------------------------------

    def start(self, request) -> list[Sequence]:
        """The request's sequences to schedule now (DeepConf's warm-up holds the rest back)."""
        params: SamplingParams = request.params
        exits = request.exits = RequestExits()
        seqs = request.seqs
        if params.early_stop != "deepconf":
            return seqs
        if params.deepconf_threshold is not None:
            exits.threshold = params.deepconf_threshold
            for seq in seqs:
                seq.conf_threshold = params.deepconf_threshold
            return seqs
        if params.n <= params.deepconf_warmup:
            return seqs  # every trace is a warm-up trace: nothing stops
        exits.warmup, exits.held = seqs[: params.deepconf_warmup], seqs[params.deepconf_warmup :]
        return exits.warmup

    def after_step(self, batch_seqs, finished: list[Sequence]) -> list[Sequence]:
        """Advance warm-ups, consensus and probes after a step; returns the traces (not probes) that finished."""
        traces = []
        for seq in finished:
            if seq.probe_of is not None:
                self._probe_done(seq)
            else:
                traces.append(seq)
        requests = self.engine.requests
        for seq in traces:
            request = requests.get(seq.request_id)
            if request is not None:
                self.trace_ended(request, seq)
        for seq in batch_seqs:
            if seq.probe_of is None and seq.status is SequenceStatus.RUNNING and seq.params.early_stop == "deer":
                request = requests.get(seq.request_id)
                if request is not None:
                    self._maybe_probe(request, seq)
        return traces

    def abort(self, request) -> None:
        """Drop the request's probes (the request is aborted): its traces' tokens are all final."""
        exits = getattr(request, "exits", None)
        if exits is not None:
            self.scheduler.abort(list(exits.probes.values()))
            exits.probes.clear()
            for seq in request.seqs:
                seq.pending_at = None

    def tokens_spent(self, request) -> int:
        """Every token generated for the request: its traces' (kept and cut) and its probes'."""
        exits = request.exits
        return sum(s.num_generated + s.discarded for s in request.seqs) + exits.probe_tokens

    # -- DeepConf ----------------------------------------------------------------------------------------------

    def trace_ended(self, request, seq: Sequence) -> None:
        """A trace of the request finished (or was stopped): its pending probe goes; the warm-up may be complete
        (the held traces start), the vote may be settled."""
        exits: RequestExits = request.exits
        probe = exits.probes.pop(seq.seq_id, None)
        seq.pending_at = None
        if probe is not None:  # the trace ended before its probe answered
            exits.probe_tokens += probe.num_generated
            self.scheduler.abort([probe])
        params: SamplingParams = request.params
        if params.early_stop != "deepconf":
            return
        window = params.confidence_window
        if exits.held and all(s.status is SequenceStatus.FINISHED for s in exits.warmup):
            # Over the part the online check watches: the thinking (the whole trace without a thinking phase).
            scores = [confidence.lowest_group_confidence(checked_part(s), window) for s in exits.warmup]
            scores = [x for x in scores if x is not None]
            exits.threshold = confidence.warmup_threshold(scores, params.deepconf_keep) if scores else None
            for held in exits.held:
                held.conf_threshold = exits.threshold
                self.scheduler.add(held)
            exits.held = []
        if params.deepconf_consensus is not None and not exits.held:
            self._consensus(request, params)

    def _consensus(self, request, params: SamplingParams) -> None:
        done = [s for s in request.seqs if s.status is SequenceStatus.FINISHED and s.early_exit is None]
        open_ = [s for s in request.seqs if s.status is not SequenceStatus.FINISHED]
        if not open_ or len(done) < min(params.deepconf_warmup, params.n):
            return
        window = params.confidence_window
        decode = self.engine.tokenizer.decode
        answers, weights = [], []
        for s in done:
            answers.append(extract_boxed(decode(s.output_parts()[2])))
            weights.append(confidence.lowest_group_confidence(s.confidences, window) or 0.0)
        vote = majority_vote(answers, weights)
        if vote.answer is None or vote.weight_share < params.deepconf_consensus:
            return
        self.scheduler.abort(open_)
        for s in open_:
            s.phase, s.finish = DONE, FINISH_STOP
            s.early_exit, s.exit_index = confidence.CONSENSUS, s.num_generated

    # -- DEER ----------------------------------------------------------------------------------------------------

    def _maybe_probe(self, request, seq: Sequence) -> None:
        """Fork a probe at the trace's latest transition token, if it samples one while thinking."""
        params: SamplingParams = request.params
        exits: RequestExits = request.exits
        if (seq.phase != THINKING or seq.early_exit is not None or seq.seq_id in exits.probes
                or seq.probes >= params.deer_max_probes):
            return
        tokenizer = self.engine.tokenizer
        strings = params.deer_transitions or tokenizer.deer_transitions()
        out = seq.output_ids
        start = max(seq.deer_scanned, 1)
        seq.deer_scanned = len(out)
        at = next((i for i in range(len(out) - 1, start - 1, -1) if is_transition(tokenizer, strings, out, i)), None)
        if at is None:
            return
        opening = tokenizer.hf(params.deer_prefix, add_special_tokens=False)["input_ids"]  # no BOS mid-sequence
        context = seq.token_ids[: seq.num_prompt_tokens + at] + list(seq.marker) + list(opening)
        if len(context) + params.deer_probe_tokens > self.engine.window:
            return
        probe = Sequence(
            seq_id=next(self.engine._seq_ids), request_id=seq.request_id, sample_index=-1, token_ids=context,
            num_prompt_tokens=len(context), params=SamplingParams(temperature=0.0, max_tokens=params.deer_probe_tokens),
            seed=0, marker=seq.marker, stop_ids=tuple(tokenizer.eos_ids), max_new_tokens=params.deer_probe_tokens)
        probe.probe_of, probe.probe_at = seq, at
        seq.probes += 1
        seq.pending_at = at
        exits.probes[seq.seq_id] = probe
        self.scheduler.add(probe)

    def _probe_done(self, probe: Sequence) -> None:
        trace = probe.probe_of
        request = self.engine.requests.get(trace.request_id)
        if request is None or request.exits.probes.get(trace.seq_id) is not probe:
            return
        exits: RequestExits = request.exits
        del exits.probes[trace.seq_id]
        trace.pending_at = None
        trace.deer_scanned = max(trace.deer_scanned, trace.num_generated)  # what it sampled meanwhile may be sent
        exits.probe_tokens += probe.num_generated
        prefix = request.params.deer_prefix
        answer = probe_confidence(probe, self.engine.tokenizer.decode, prefix.count("{") - prefix.count("}"))
        trace.probe_log.append((probe.probe_at, answer))
        if answer is None or answer < request.params.deer_threshold:
            return
        # Confident: the thought ends at the transition, if the trace is still thinking past it.
        if trace.status is SequenceStatus.FINISHED or trace.phase != THINKING or trace.num_generated < probe.probe_at:
            return
        trace.discarded += self.scheduler.rewind(trace, probe.probe_at)
        self.scheduler.end_thinking(trace)
        trace.early_exit, trace.exit_index = confidence.DEER, probe.probe_at


def checked_part(seq: Sequence) -> list[float]:
    """The confidences DeepConf's online check watches in a trace: its thinking tokens' (all of them without a
    thinking phase). A warm-up trace's threshold comes from the same part, so a dip in an answer or at the marker
    does not set a bar that thinking never meets."""
    if seq.params.think_budget is None:
        return seq.confidences
    return seq.confidences[: seq.output_thought[0]]


def is_transition(tokenizer, strings: tuple[str, ...], out: list[int], i: int) -> bool:
    """Whether output token i turns the thought: its text holds a transition string, or completes one with the token
    before it (a "\n\n" written as two "\n" tokens). Decodes a token or two: no scan of the vocabulary."""
    text = tokenizer.decode(out[i : i + 1])
    if any(s in text for s in strings):
        return True
    pair, first = tokenizer.decode(out[i - 1 : i + 1]), tokenizer.decode(out[i - 1 : i])
    return any(s in pair and s not in first for s in strings)


def probe_confidence(probe: Sequence, decode, depth: int = 1) -> float | None:
    """DEER's answer confidence: the mean probability of the probe's answer tokens, up to and including the one that
    closes the box (braces counted: "\\frac{1}{2}" is one answer); None when the box does not close within the
    probe's tokens (an unfinished answer is never confident). `depth`: the braces the answer prefix left open."""
    for i, token in enumerate(probe.output_ids):
        for ch in decode([token]):
            depth += (ch == "{") - (ch == "}")
            if depth == 0:
                probs = [math.exp(x) for x in probe.logprobs[: i + 1]]
                return sum(probs) / len(probs)
    return None
