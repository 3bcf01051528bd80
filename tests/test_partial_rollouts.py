"""A rollout's budget is the rollout's, not the request's (core/resume.py): a rollout resubmitted as prompt +
the tokens it had (AReaL's and slime's partial rollouts after an abort) keeps the thinking it spent, a
prompt whose thought is closed goes on solving, and each assistant turn of a conversation has its own
budget. Greedy float32, so the tokens of a resubmitted rollout are the unsplit rollout's too."""
from __future__ import annotations

import pytest

from elastic_decode import InvalidRequestError, SamplingParams
from elastic_decode.core.resume import start_state
from elastic_decode.kernels import THINKING
from engines import tiny_llm

USER = [{"role": "user", "content": "What is 12 + 7? Think it through."}]


def greedy(**budgets) -> SamplingParams:
    return SamplingParams(temperature=0.0, ignore_eos=True, **budgets)


def resubmit(llm, prompt: list[int], out, k: int, params: SamplingParams):
    """The rollout split after its first k tokens: the rest, generated from prompt + those k."""
    rest = params if params.max_tokens is None else SamplingParams(
        **{**vars(params), "max_tokens": params.max_tokens - k})
    return llm.generate([prompt + out.token_ids[:k]], rest, use_tqdm=False)[0].outputs[0]


def accounting(c) -> tuple:
    return c.think_tokens, c.solution_tokens, c.forced_end, c.finish_reason


@pytest.mark.slow
def test_a_resubmitted_rollout_thinks_to_its_budget_in_all(embedded_path):
    """The embedded model, t = 16: a prompt plus the first 10 thinking tokens of an earlier rollout thinks 6
    more, 16 in all (it used to get a fresh budget: 26)."""
    llm = tiny_llm(embedded_path, max_model_len=2048)
    prompt = llm.encode_chat(USER)
    params = greedy(think_budget=16, solution_budget=12)
    whole = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert whole.think_tokens == 16 and whole.forced_end
    rest = resubmit(llm, prompt, whole, 10, params)
    assert rest.think_tokens == 16  # the rollout's: 10 in the prompt, 6 new
    assert len(llm.engine.tokenizer.hf(rest.thinking_text, add_special_tokens=False)["input_ids"]) <= 7
    assert whole.token_ids[:10] + rest.token_ids == whole.token_ids
    assert accounting(rest) == accounting(whole)
    assert rest.forced_mask == whole.forced_mask[10:]


def marker_from(llm, prompt, at: int, width: int) -> tuple[int, ...]:
    """`width` tokens the model writes greedily from position `at` on (and nowhere earlier): a marker the
    model closes its thought with by itself."""
    free = llm.generate([prompt], greedy(max_tokens=at + width + 4), use_tqdm=False)[0].outputs[0].token_ids
    for start in range(at, len(free) - width):
        marker = tuple(free[start:start + width])
        if all(tuple(free[i:i + width]) != marker for i in range(start)):
            return marker
    pytest.skip("the tiny model repeats itself: no marker to close with")


@pytest.mark.parametrize("case", ["forced", "closed-1", "closed-3", "solution-cut"])
def test_any_split_of_a_rollout_gives_the_unsplit_accounting(tiny_models, case):
    llm = tiny_llm(tiny_models["qwen3"])
    prompt = llm.encode_chat(USER)
    if case == "forced":  # the budget runs out: the marker is forced
        params = greedy(think_budget=5, solution_budget=6)
    elif case == "solution-cut":  # ... and a max_tokens that ends it inside the solution
        params = greedy(think_budget=4, solution_budget=20, max_tokens=12)
    else:  # the model writes the marker itself (a 1- or 3-token marker) before its budget
        width = int(case[-1])
        params = greedy(think_budget=12, solution_budget=5, end_think=marker_from(llm, prompt, 3, width))
    whole = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert whole.forced_end == (case in ("forced", "solution-cut"))
    thought_end = whole.think_tokens + len(llm.engine.tokenizer.marker(params.end_think))
    for k in range(len(whole.token_ids)):
        rest = resubmit(llm, prompt, whole, k, params)
        assert whole.token_ids[:k] + rest.token_ids == whole.token_ids, k
        assert accounting(rest) == accounting(whole), k
        assert rest.forced_mask == whole.forced_mask[k:], k
        if whole.think_tokens <= k <= thought_end:  # split at or inside the marker: no thinking text, the solution
            assert rest.thinking_text == "" and rest.solution_text == whole.solution_text, k


def test_each_assistant_turn_has_its_own_budget(tiny_models):
    """A conversation whose earlier assistant turn thought at length: the new turn's budget is whole."""
    llm = tiny_llm(tiny_models["llama"])
    params = greedy(think_budget=4, solution_budget=3)
    first = llm.chat(USER, params, use_tqdm=False)[0].outputs[0]
    earlier = "<think>" + "ponder " * 30 + "</think> 19"
    conversation = USER + [{"role": "assistant", "content": earlier}, {"role": "user", "content": "And 3 + 4?"}]
    again = llm.chat(conversation, params, use_tqdm=False)[0].outputs[0]
    assert first.think_tokens == again.think_tokens == 4 and again.forced_end


def test_the_request_can_say_what_is_spent(tiny_models):
    llm = tiny_llm(tiny_models["llama"])
    prompt = [1, 5, 9, 300, 7, 11, 12]  # no chat template: nothing to read off
    fresh = llm.generate([prompt], greedy(think_budget=6, solution_budget=3), use_tqdm=False)[0].outputs[0]
    assert fresh.think_tokens == 6
    spent = llm.generate([prompt], greedy(think_budget=6, solution_budget=3, think_spent=4),
                         use_tqdm=False)[0].outputs[0]
    marker = llm.engine.tokenizer.marker(None)
    assert spent.think_tokens == 6  # the rollout's: 4 said spent, 2 new, then the forced marker
    assert spent.forced_mask == [0, 0] + [1] * len(marker) + [0] * 3 and spent.token_ids[2:2 + len(marker)] == list(marker)
    solving = llm.generate([prompt], greedy(think_budget=6, solution_budget=3, solution_spent=1),
                           use_tqdm=False)[0].outputs[0]
    assert solving.solution_tokens == 3 and len(solving.token_ids) == 2 and not solving.thinking_text
    with pytest.raises(InvalidRequestError, match="nothing is left to generate"):
        llm.generate([prompt], greedy(think_budget=6, solution_budget=3, solution_spent=3), use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="think_spent"):
        llm.generate([prompt], greedy(think_budget=6, solution_budget=3, think_spent=len(prompt) + 1), use_tqdm=False)


THINK, MARK, EOS, START = 90, (91, 92), 2, (70, 71)


def state_of(prompt, **known):
    return start_state(prompt, MARK, greedy(think_budget=8, solution_budget=4), known.get("start", ()), THINK, (EOS,))


def test_a_bare_think_opens_a_rollout_only_while_its_thought_is_open():
    """Without an assistant start, `<think>` marks a rollout only while open: a closed block (a few-shot
    example in a raw prompt) starts fresh instead of solving."""
    assert state_of([5, THINK, 6, 7]).think_count == 2
    fresh = state_of([5, THINK, 6, 7, *MARK, 8, 9, 10])
    assert fresh.phase == THINKING and fresh.think_count == 0 and fresh.prompt_think == 0


def test_a_finished_assistant_turn_is_not_resumed():
    """The last assistant turn holds an end of turn (the prompt goes on past it): a fresh budget, not the
    turn's tokens counted."""
    resumed = state_of([5, *START, 6, 7, 8], start=START)
    assert resumed.think_count == 3
    ended = state_of([5, *START, 6, 7, 8, EOS, 40, 41], start=START)
    assert ended.phase == THINKING and ended.think_count == 0
