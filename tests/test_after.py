"""examples/: the pricer trained further by DPO or GRPO on its own answers (train_pricer.py --after)."""
import json
import math
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))

from test_pricer import run_script, write_csv, write_tiny_checkpoint  # noqa: E402

from pricer import Item, make_prompt  # noqa: E402
from pricer.tuning import HIT_BONUS, NO_NUMBER, WORST, miss_pairs, price_reward, reward_rows  # noqa: E402


def test_the_price_reward_is_minus_the_log_ratio_with_a_bonus_for_a_hit():
    assert price_reward("p", "1,234.00", price=1234.0) == pytest.approx(HIT_BONUS)
    assert price_reward("p", "about 99", price=49.0) == pytest.approx(-math.log(100 / 50))      # $50 off, 102%: a miss
    assert price_reward("p", "110.00", price=100.0) == pytest.approx(-math.log(111 / 101) + HIT_BONUS)
    assert price_reward("p", "0", price=5000.0) == WORST                                          # log 5001 > 3: held
    assert price_reward("p", "no idea", price=100.0) == NO_NUMBER < WORST


def test_pairs_come_from_the_misses_written_as_the_answers_were():
    items = [Item(make_prompt(f"diamond {i}"), price) for i, price in enumerate((100.0, 500.0, 2000.0))]
    pairs = miss_pairs(items, ["104", "900.00", "garbage"])
    assert pairs == [{"prompt": items[1].prompt, "chosen": "500.00", "rejected": "900.00"},
                     {"prompt": items[2].prompt, "chosen": "2000.00", "rejected": "0.00"}]
    assert reward_rows(items[:1]) == [{"prompt": items[0].prompt, "price": 100.0}]


@pytest.mark.parametrize("objective", ["dpo", "grpo"])
def test_train_pricer_after_an_adapter_trains_it_further_and_scores_before_and_after(objective, tmp_path):
    tiny = write_tiny_checkpoint(str(tmp_path / "tiny"))
    data = tmp_path / "items.csv"
    write_csv(data, ["text", "price"],
              [[f"Diamond: 0.{i} carat, {['Ideal', 'Good'][i % 2]} cut", 100 + 37 * i] for i in range(20)])
    common = ["--model", tiny, "--data", str(data), "--train-size", "8", "--val-size", "4", "--test-size", "4",
              "--device", "cpu", "--no-progress", "--seed", "3"]
    run_script("train_pricer.py", *common, "--out", str(tmp_path / "sft"), "--max-steps", "2", "--batch-size", "4",
               "--r", "4", "--alpha", "8", "--layers", "all", "--save-every", "0", "--top-k-average", "0", cwd=tmp_path)
    out = tmp_path / objective
    log = run_script("train_pricer.py", *common, "--after", str(tmp_path / "sft" / "adapter"), "--objective", objective,
                     "--out", str(out), "--max-steps", "2", "--batch-size", "2", "--tune-size", "6",
                     "--group-size", "2", cwd=tmp_path)
    record = json.loads((out / "after.json").read_text())
    assert record["objective"] == objective and record["steps"] == 2 and record["seed"] == 3
    assert set(record["cpu_s"]) == {"score SFT", "data", "train", "score"}
    assert f"{objective.upper()} after {tmp_path / 'sft' / 'adapter'}: hits" in log
    assert sorted(os.listdir(out / "adapter"))[:2] == ["adapter_config.json", "adapter_model.safetensors"]
    names = {"dpo": "rewards/margins", "grpo": "reward"}
    assert all(names[objective] in m for _, m in record["metrics"])
    # the tuned adapter keeps the split its SFT start trained on: eval_pricer scores the same held-out items
    split = {a: json.loads((tmp_path / a / "adapter" / "trained_on.json").read_text())["split"] for a in ("sft", objective)}
    assert split["sft"] == split[objective] and split["sft"]["seed"] == 3
    other_seed = [*common[:-1], "4", "--after", str(tmp_path / "sft" / "adapter"), "--objective", objective,
                  "--out", str(tmp_path / "other")]
    proc = subprocess.run([sys.executable, os.path.join(HERE, "..", "examples", "train_pricer.py"), *other_seed],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "trained on the split of seed 3" in proc.stderr


def test_after_goes_with_dpo_or_grpo(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_pricer", os.path.join(HERE, "..", "examples", "train_pricer.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for argv in (["--objective", "dpo"], ["--after", str(tmp_path)]):
        with pytest.raises(SystemExit) as done:
            mod.parse_args(argv)
        assert done.value.code == 2 and "--after ADAPTER goes with --objective dpo or grpo" in capsys.readouterr().err
