"""What train/'s data docstrings state, checked: where an Example is cut to max_len (one place, its end),
how a (prompt, answer) pair is cut instead, which micro-batches a DataPlan counts, and which messages may
leave their content out.

The tokenizer is the embedded SmolLM2's (its chat template included): real ids and a real template at
no model's cost.
"""
import json
import warnings

import pytest

from model import Tokenizer, default_checkpoint
from train import Example, IGNORE_INDEX, TrainConfig, chat_example, load_chat_jsonl
from train.chat import check_conversation
from train.data import as_examples, build_examples
from train.plan import DataPlan

CHAT = [{"role": "user", "content": "How much is a 0.3 carat diamond, Ideal cut, color E, clarity VS1?"},
        {"role": "assistant", "content": "About $712, give or take a little."}]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_gguf(default_checkpoint())


def test_an_example_keeps_its_first_max_len_tokens():
    e = Example(list(range(10)), [IGNORE_INDEX] * 4 + list(range(4, 10)))
    assert e.cut(4) == Example([0, 1, 2, 3], [IGNORE_INDEX] * 4)
    assert e.cut(7) == Example(list(range(7)), [IGNORE_INDEX] * 4 + [4, 5, 6])
    assert e.cut(None) is e and e.cut(10) is e and e.cut(11) is e


def test_chat_jsonl_and_train_cut_an_example_in_one_place_at_its_end(tok, tmp_path, monkeypatch):
    """TrainConfig.max_len: an Example keeps its first max_len tokens, through Example.cut, wherever it is cut."""
    whole = chat_example(tok, CHAT)
    n = len(whole.input_ids) - 3                     # the last three tokens go, <|im_end|> among them
    assert any(y != IGNORE_INDEX for y in whole.labels[n:]) and whole.n_answer_tokens > 3
    calls = []
    original = Example.cut
    monkeypatch.setattr(Example, "cut", lambda self, m: calls.append(m) or original(self, m))

    assert chat_example(tok, CHAT, max_len=n) == Example(whole.input_ids[:n], whole.labels[:n])
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n")
    data = load_chat_jsonl(str(path), tok, max_len=n)
    assert data.examples == [Example(whole.input_ids[:n], whole.labels[:n])] and data.truncated == 1
    examples, skipped = as_examples(tok, [whole], max_len=n)   # what train() does with its Examples
    assert examples == [Example(whole.input_ids[:n], whole.labels[:n])] and skipped == 0
    assert [m for m in calls if m is not None] == [n, n, n]   # chat_example, load_chat_jsonl, as_examples


def test_a_pair_loses_prompt_tokens_on_the_left_and_keeps_its_answer_whole(tok):
    """TrainConfig.max_len, for (prompt, answer) pairs: the prompt's start goes, the answer (+ EOS) stays."""
    prompt, answer = "How much does this cost to the nearest dollar?\n\nDiamond: 0.3 carat\n\nPrice is $", "712.00"
    (whole,), _ = build_examples(tok, [(prompt, answer)])
    n_answer = whole.n_answer_tokens
    (cut,), skipped = build_examples(tok, [(prompt, answer)], max_len=n_answer + 3)
    assert skipped == 0 and len(cut.input_ids) == n_answer + 3
    assert cut.input_ids == whole.input_ids[-(n_answer + 3):] and cut.labels == whole.labels[-(n_answer + 3):]
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert build_examples(tok, [(prompt, answer)], max_len=n_answer) == ([], 1)   # no room left for it whole


def examples_of(n: int) -> list[Example]:
    return [Example([1, 2, 3], [IGNORE_INDEX, 2, 3]) for _ in range(n)]


def test_a_batch_smaller_than_the_processes_is_a_clear_error_not_a_division_by_zero():
    with pytest.raises(ValueError, match=r"batch_size is 1, fewer than the 2 processes.*batch_size to 2 or more"):
        DataPlan(examples_of(8), TrainConfig(batch_size=1), world_size=2)
    with pytest.raises(ValueError, match=r"batch_size is 3, fewer than the 4 processes"):
        DataPlan(examples_of(8), TrainConfig(batch_size=3, packing=True, max_len=8), world_size=4)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_the_plan_counts_exactly_the_micro_batches_it_trains_on(world_size):
    """steps_per_epoch comes from the micro-batches `_micro_batches` keeps: each step of an epoch has
    grad_accum of them (the last fewer), none empty, and every kept micro-batch is used once."""
    for n in range(world_size, 12):
        for batch_size in range(world_size, 6):
            for grad_accum in (1, 2, 3):
                plan = DataPlan(examples_of(n), TrainConfig(batch_size=batch_size, grad_accum=grad_accum),
                                world_size=world_size)
                kept = plan._micro_batches(0)
                steps = [plan.step_batches(s) for s in range(plan.steps_per_epoch)]
                assert all(steps) and sum(map(len, steps)) == len(kept), (n, batch_size, grad_accum)
                assert all(len(mb) >= world_size for step in steps for mb in step)


def test_only_an_assistant_may_leave_its_content_out_for_tool_calls():
    call = [{"type": "function", "function": {"name": "price", "arguments": "{}"}}]
    check_conversation([CHAT[0], {"role": "assistant", "content": None, "tool_calls": call}])
    check_conversation([CHAT[0], {"role": "assistant", "tool_calls": call}, CHAT[1]])
    with pytest.raises(ValueError, match=r"message 0 \(user\) has no 'content' string \(only an assistant's"):
        check_conversation([{"role": "user", "tool_calls": call}, CHAT[1]])
    with pytest.raises(ValueError, match=r"message 1 \(assistant\) has no 'content' string"):
        check_conversation([CHAT[0], {"role": "assistant", "content": None}])
