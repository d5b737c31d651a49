"""The example command lines answer a user's mistake with one line, `error: <message>`, and status 2.

Each case runs the script's `main(argv)` in this process on a tiny model written to disk; a bug
(any other exception) must still raise with its traceback.
"""
import argparse
import importlib.util
import os
import signal
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(os.path.dirname(HERE), "examples")
sys.path.insert(0, HERE)

from test_pricer import write_csv, write_tiny_checkpoint  # noqa: E402

from pricer import DEMO_SEED  # noqa: E402
from train import TrainingInterrupted  # noqa: E402


def load_script(name):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), os.path.join(EXAMPLES, name))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def scripts():
    return load_script("train_pricer.py"), load_script("eval_pricer.py")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = write_tiny_checkpoint(str(root / "tiny"))
    data = root / "items.csv"
    write_csv(data, ["text", "price"], [[f"Diamond: 0.{i} carat, Ideal cut", 100 + 37 * i] for i in range(16)])
    empty = root / "empty.csv"
    write_csv(empty, ["text", "price"], [])
    broken = root / "broken_adapter"
    broken.mkdir()
    (broken / "adapter_config.json").write_bytes(b"\x00\xff{not json")
    (broken / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    return dict(model=model, data=str(data), empty=str(empty), broken=str(broken), out=str(root / "out"))


def one_error_line(capsys, code, expected):
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err


def train_args(files, *extra):
    return ["--model", files["model"], "--data", files["data"], "--quant", "none", "--device", "cpu", "--out",
            files["out"], "--train-size", "8", "--val-size", "2", "--test-size", "2", "--layers", "all", "--no-progress", *extra]


@pytest.mark.parametrize("case,expected", [
    ("bad rank", "LoRA rank r must be a positive integer, got r=0"),
    ("unknown target", "q_projj"),
    ("missing model", "no_such_model"),
    ("missing data", "no_such_data.csv"),
    ("empty data", "0 items leave none to train on"),
    ("llama preset without a model", "--preset llama31-8b needs --model"),
])
def test_train_pricer_user_errors_are_one_line_and_status_2(scripts, files, capsys, case, expected):
    args = {
        "bad rank": train_args(files, "--r", "0"),
        "unknown target": train_args(files, "--target", "q_projj"),
        "missing model": train_args(files, "--model", os.path.join(files["out"], "no_such_model")),
        "missing data": train_args(files, "--data", os.path.join(files["out"], "no_such_data.csv")),
        "empty data": train_args(files, "--data", files["empty"]),
        "llama preset without a model": ["--preset", "llama31-8b", "--device", "cpu"],
    }[case]
    one_error_line(capsys, scripts[0].main(args), expected)


@pytest.mark.parametrize("case,expected", [
    ("unreadable adapter config", "adapter_config.json: not valid JSON"),
    ("missing adapter", "no_such_adapter"),
    ("unreadable adapter weights", "adapter_model.safetensors"),
])
def test_eval_pricer_user_errors_are_one_line_and_status_2(scripts, files, capsys, tmp_path, case, expected):
    adapter = files["broken"]
    if case == "missing adapter":
        adapter = str(tmp_path / "no_such_adapter")
    elif case == "unreadable adapter weights":  # a valid config, weights cut short
        import shutil

        from lora import LoRAConfig

        adapter = str(tmp_path / "adapter")
        os.makedirs(adapter)
        import json

        with open(os.path.join(adapter, "adapter_config.json"), "w") as f:
            json.dump(LoRAConfig(r=4, alpha=8).to_peft_dict(), f)
        shutil.copy(os.path.join(files["broken"], "adapter_model.safetensors"), adapter)
    code = scripts[1].main(["--adapter", adapter, "--model", files["model"], "--data", files["data"], "--quant", "none",
                            "--device", "cpu", "--n", "2", "--out", str(tmp_path / "eval")])
    one_error_line(capsys, code, expected)


def test_a_bug_keeps_its_traceback_and_a_preemption_names_checkpoint_and_resume_command(scripts, files, monkeypatch,
                                                                                      capsys):
    train_pricer = scripts[0]

    def bug(*a, **kw):
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr(train_pricer, "load_model", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        train_pricer.main(train_args(files))

    def preempted(args):
        raise TrainingInterrupted(signal.SIGTERM, 3, 10, os.path.join(args.out, "checkpoint-3"))

    monkeypatch.setattr(train_pricer, "run", preempted)
    assert train_pricer.main(train_args(files)) == 143
    script = os.path.relpath(os.path.join(EXAMPLES, "train_pricer.py"))
    script = script if not script.startswith("..") else os.path.join(EXAMPLES, "train_pricer.py")
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"stopped by SIGTERM after step 3 of 10: checkpoint {files['out']}/checkpoint-3; resume with: "
                     f"python {script} "
                     + " ".join(train_args(files)) + " --resume"]


def test_the_course_preset_picks_fp16_where_the_gpu_has_no_bf16(scripts, monkeypatch):
    train_pricer = scripts[0]
    for has_bf16, want in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **kw: has_bf16)
        assert train_pricer.base_dtype(train_pricer.PRESETS["llama31-8b"], "cuda") == want
    assert train_pricer.base_dtype(train_pricer.PRESETS["llama31-8b"], "cpu") is None


def test_no_flags_is_the_demo_seed_and_recipe_and_each_flag_takes_its_presets_value(scripts):
    """cli.add_recipe_flags: every recipe flag, --dora included, defaults to the preset's value and a flag
    given overrides it; with no flags train_pricer.py is `make demo` (seed DEMO_SEED, PRESETS["demo"])."""
    train_pricer = scripts[0]
    args = train_pricer.parse_args([])
    assert args.seed == DEMO_SEED == 0
    assert {k: getattr(args, k) for k in train_pricer.PRESETS["demo"]} == train_pricer.PRESETS["demo"]
    import cli

    presets = {"plain": dict(train_pricer.PRESETS["demo"]), "dora": dict(train_pricer.PRESETS["demo"], dora=True)}
    for preset, argv, want in (("plain", [], False), ("dora", [], True), ("plain", ["--dora"], True),
                               ("dora", ["--no-dora"], False)):
        p = argparse.ArgumentParser()
        cli.add_recipe_flags(p, presets, "tokens")
        assert cli.fill_from_preset(p.parse_args(argv), presets[preset]).dora is want, (preset, argv)


def test_eval_pricer_describes_the_diamonds_as_the_demo_trained_on_them(scripts, files, monkeypatch):
    train_pricer, eval_pricer = scripts
    # the demo's adapter learned the four-Cs prompt: scoring it with another description would be wrong
    assert eval_pricer.parse_args([]).description == train_pricer.parse_args([]).description == "four-cs"
    asked = []

    def load_source(data, tokenizer=None, description="full"):
        asked.append(description)
        raise ValueError("stop after the data")

    monkeypatch.setattr(eval_pricer, "load_source", load_source)
    for description in ("four-cs", "full"):
        assert eval_pricer.main(["--model", files["model"], "--quant", "none", "--device", "cpu",
                                 "--description", description, "--out", files["out"]]) == 2
    assert asked == ["four-cs", "full"]


def test_export_gguf_answers_mistakes_with_one_line_and_writes_the_adapter_alone(files, capsys, tmp_path):
    from lora import LoRAConfig, apply_lora, save_adapter
    from model import load_pretrained

    export_gguf = load_script("export_gguf.py")
    model, _ = load_pretrained(files["model"])
    apply_lora(model, LoRAConfig(r=2, alpha=4, target_modules=("q_proj", "v_proj")))
    save_adapter(model, str(tmp_path / "adapter"))
    out = str(tmp_path / "tiny.gguf")
    args = ["--adapter", str(tmp_path / "adapter"), "--model", files["model"], "--out", out]
    # the tiny checkpoint's word-level tokenizer is nothing llama.cpp reads
    one_error_line(capsys, export_gguf.main(args), "has no GGUF form llama.cpp reads")
    one_error_line(capsys, export_gguf.main(["--adapter", str(tmp_path / "no_such_adapter"), "--out", out]),
                   "no_such_adapter")
    assert not os.path.exists(out)
    assert export_gguf.main(args + ["--adapter-only"]) == 0
    assert f"--lora {out}" in capsys.readouterr().out and os.path.getsize(out) > 0


def test_eval_pricer_scores_only_items_the_adapter_never_trained_on(scripts, files, capsys, monkeypatch, tmp_path):
    """The adapter's trained_on.json gives the split: its test and validation items are scored, a --seed
    that disagrees or an --n that reaches into its training items is refused before the model loads."""
    from lora import LoRAConfig, apply_lora, save_adapter
    from model import load_pretrained
    from pricer import load_source, split_items, split_record

    eval_pricer = scripts[1]
    model, _ = load_pretrained(files["model"])
    apply_lora(model, LoRAConfig(r=2, alpha=4, target_modules=("q_proj",)))
    adapter = str(tmp_path / "adapter")
    save_adapter(model, adapter, split=split_record(files["data"], "four-cs", 3, 2, 2, 12))
    scored = []

    def evaluate_prices(model, tokenizer, items, *args, **kwargs):
        from pricer import score

        scored.append(list(items))
        return score([1.0] * len(items), [i.price for i in items])

    monkeypatch.setattr(eval_pricer, "evaluate_prices", evaluate_prices)
    base = ["--adapter", adapter, "--model", files["model"], "--quant", "none", "--device", "cpu",
            "--out", str(tmp_path / "eval")]
    assert eval_pricer.main(base + ["--n", "4"]) == 0  # its own data, from the record
    split = split_items(load_source(files["data"]).items, 3, 2, 2)
    assert scored == [split.test + split.val]
    one_error_line(capsys, eval_pricer.main(base + ["--n", "4", "--seed", "42"]), "--seed 42: ")
    one_error_line(capsys, eval_pricer.main(base + ["--n", "5"]), "--n 5: ")
    one_error_line(capsys, eval_pricer.main(base + ["--n", "4", "--data", "diamonds"]), "--data diamonds: ")
    assert len(scored) == 1
