"""examples/finetune.py --objective dpo|grpo: preference and reward tuning from the command line.

The runs call the script's `main(argv)` in this process on test_finetune's tiny random chat model
(SmolLM2's real tokenizer and chat template), as test_finetune.py does for sft.
"""
import json
import os

import pytest

from test_finetune import FLAGS, files, one_error_line, run, smol_tok  # noqa: F401 (fixtures)

PAIRS = [{"prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}],
          "chosen": [{"role": "assistant", "content": f"{2 * i}."}],
          "rejected": [{"role": "assistant", "content": f"{2 * i + 1}, I think."}]} for i in range(6)]
PROMPTS = [{"prompt": [{"role": "user", "content": f"Say {i} in words."}], "number": i} for i in range(6)]
REWARD = '''
def short(prompt, completion, number):
    """Shorter is better; the row's number written in it is better still."""
    return -len(completion) / 10 + (1.0 if str(number) in completion else 0.0)
'''


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_dpo_trains_on_preference_rows_and_logs_trls_metrics(files, capsys, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / "dpo"
    log = run("--model", files["model"], "--objective", "dpo", "--data", data, "--val", data, "--out", str(out),
              "--max-steps", "3", "--save-every", "0", capsys=capsys)
    assert f"{data}: 6 pairs" in log and "(3 steps)" in log
    assert "rewards/margins 0.0000 -> " in log and "rewards/accuracies" in log   # step 1: the policy is its reference
    assert os.path.isfile(out / "adapter" / "adapter_model.safetensors")


def test_grpo_trains_on_prompt_rows_with_a_reward_from_a_file(files, capsys, tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    (tmp_path / "rewards.py").write_text(REWARD)
    log = run("--model", files["model"], "--objective", "grpo", "--data", data, "--reward",
              f"{tmp_path / 'rewards.py'}:short", "--max-new-tokens", "6", "--group-size", "2", "--out",
              str(tmp_path / "grpo"), "--max-steps", "2", "--save-every", "0", capsys=capsys)
    assert f"{data}: 6 prompts" in log and "(2 steps)" in log and "reward " in log and "completions/mean_length" in log


@pytest.mark.parametrize("objective", ["dpo", "grpo"])
def test_the_embedded_diamonds_train_with_each_objective(objective, files, capsys, tmp_path):
    log = run("--model", files["model"], "--objective", objective, "--out", str(tmp_path / objective), "--max-steps",
              "2", "--save-every", "0", "--train-size", "8", "--val-size", "2", "--test-size", "2", "--group-size", "2",
              capsys=capsys)
    kind = "pairs" if objective == "dpo" else "prompts"
    assert f"8 train, 2 validation, 2 held out, as {kind}" in log and "(2 steps)" in log
    assert "before training: 2 held-out diamonds" in log and "| after training |" in log


def test_grpo_flags_errors_are_one_line(files, capsys, tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    (tmp_path / "rewards.py").write_text(REWARD)
    out = ["--model", files["model"], "--objective", "grpo", "--data", data, "--out", str(tmp_path / "o")]
    one_error_line(capsys, out, "--objective grpo --data FILE needs --reward PATH.py:FUNCTION")
    one_error_line(capsys, [*out, "--reward", f"{tmp_path / 'none.py'}:short"], "no such file")
    one_error_line(capsys, [*out, "--reward", f"{tmp_path / 'rewards.py'}:long"], "has no function 'long'")
    bad = write_jsonl(tmp_path / "bad.jsonl", [PROMPTS[0], {"prompt": 3}])
    one_error_line(capsys, ["--model", files["model"], "--objective", "grpo", "--data", bad, "--reward",
                            f"{tmp_path / 'rewards.py'}:short", "--out", str(tmp_path / "o")],
                   f"{bad}:2: 'prompt' must be a string or a non-empty list of messages")
