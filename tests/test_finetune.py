"""examples/finetune.py: any model, any chat JSON Lines, and the embedded diamonds as a chat.

Each run calls the script's `main(argv)` in this process, on a tiny random Llama written to disk
with SmolLM2's real tokenizer and chat template (byte-level BPE, `<|im_start|>`/`<|im_end|>`), so
the conversations, labels and replies are those of a real chat model, at a tiny model's cost.
"""
import json
import os
import shutil
import signal
import sys

import pytest
import torch

from conftest import ROOT, labelled_runs, tiny_hf_config

EXAMPLES = os.path.join(ROOT, "examples")
sys.path.insert(0, EXAMPLES)

import finetune  # noqa: E402
import train.loop  # noqa: E402
from lora import load_adapter, lora_state_dict  # noqa: E402
from model import Tokenizer, default_checkpoint, load_pretrained  # noqa: E402
from pricer import (DEMO_SEED, PRESETS, answer_budget, chat_replies, end_of_turn_ids, load_diamond_chats,  # noqa: E402
                    load_diamonds, parse_price, price_answer, split_items)
from pricer.predict import continue_prompts  # noqa: E402
from train import TrainingInterrupted, chat_example, load_chat_jsonl  # noqa: E402
from train.packing import epoch_rows  # noqa: E402

PAIRS = [(f"What is {i} plus {i + 1}? Answer in words, please.", f"{i} plus {i + 1} is {2 * i + 1}.") for i in range(8)]
FLAGS = ["--quant", "none", "--device", "cpu", "--layers", "all", "--r", "4", "--alpha", "8", "--lr", "1e-2",
         "--batch-size", "2", "--grad-accum", "1", "--samples", "2", "--sample-tokens", "4", "--no-progress"]


@pytest.fixture(scope="module")
def smol_tok():
    return Tokenizer.from_gguf(default_checkpoint())


def write_tiny_chat_model(folder, tok, template=True) -> str:
    """A random 2-layer Llama (hidden 64) with SmolLM2's vocabulary, tokenizer files and, if `template`, its chat template."""
    from safetensors.torch import save_file

    from model import Llama, LlamaConfig

    os.makedirs(folder, exist_ok=True)
    saved, tok.chat_template = tok.chat_template, tok.chat_template if template else None
    tok.save_pretrained(folder)
    tok.chat_template = saved
    cfg = tiny_hf_config(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_hf(cfg))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(folder, "model.safetensors"))
    return str(folder)


@pytest.fixture(scope="module")
def files(tmp_path_factory, smol_tok):
    root = tmp_path_factory.mktemp("finetune")
    shapes = {
        "messages": [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in PAIRS],
        "prompt": [{"prompt": q, "completion": a} for q, a in PAIRS],
        "alpaca": [{"instruction": q, "input": "", "output": a} for q, a in PAIRS],
    }
    paths = {}
    for name, records in shapes.items():
        paths[name] = str(root / f"{name}.jsonl")
        with open(paths[name], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return dict(model=write_tiny_chat_model(root / "tiny", smol_tok),
                bare=write_tiny_chat_model(root / "bare", smol_tok, template=False), root=root, **paths)


def run(*argv, code=0, capsys=None) -> str:
    got = finetune.main([*FLAGS, *argv])
    out = capsys.readouterr() if capsys else None
    assert got == code, out.err if out else got
    return out.out if out else ""


def adapter(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "adapter_model.safetensors"))


# ---------------------------------------------------------------------------- the command line
def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as done:
        finetune.main(["--help"])
    assert done.value.code == 0
    words = capsys.readouterr().out.split()
    flags = ("--model --data --val --out --preset --chat-template --quant --r --alpha --dropout --target --dora "
             "--layers --epochs --max-steps --batch-size --grad-accum --lr --warmup-ratio --weight-decay "
             "--max-grad-norm --optimizer --max-len --eval-every --save-every --packing --overlong --train-size "
             "--val-size --test-size --resume --seed --device --no-progress --parallel --compile --samples "
             "--sample-tokens --eval-batch-size").split()
    assert not [f for f in flags if f not in words and f + "," not in words]


def test_the_embedded_default_is_the_demo_seed_and_recipe():
    """With no flags finetune.py runs the demo: seed DEMO_SEED, every value of PRESETS["demo"] (the chat's own
    two beside them), so its held-out diamonds and recipe are `make demo`'s."""
    args = finetune.parse_args([])
    assert args.preset == "diamonds" and args.seed == DEMO_SEED == 0
    assert {k: getattr(args, k) for k in PRESETS["demo"]} == PRESETS["demo"]
    assert (args.packing, args.overlong) == (False, "truncate")


@pytest.mark.parametrize("argv", [["--r", "four"], ["--quant", "int8"], ["--overlong", "keep"], ["--samples", "-1"],
                                  ["--parallel", "tp"]])
def test_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as done:
        finetune.main(argv)
    assert done.value.code == 2 and "error:" in capsys.readouterr().err


def one_error_line(capsys, argv, expected):
    code = finetune.main([*FLAGS, *argv])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines


def test_user_errors_are_one_line_and_status_2(files, capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(open(files["messages"]).readline() + "\n" + '{"prompt": "no completion"}\n')
    out = ["--out", str(tmp_path / "out")]
    one_error_line(capsys, ["--model", files["model"], "--data", str(bad), *out],
                   f"error: {bad}:3: missing key 'completion'")
    one_error_line(capsys, ["--model", files["model"], "--data", files["prompt"], "--val", str(bad), *out], f"{bad}:3:")
    bad.write_text("{not json\n")
    one_error_line(capsys, ["--model", files["model"], "--data", str(bad), *out], f"error: {bad}:1: not valid JSON")
    one_error_line(capsys, ["--model", files["model"], "--data", str(tmp_path / "none.jsonl"), *out], "none.jsonl")
    one_error_line(capsys, ["--model", files["model"], "--data", files["prompt"], "--r", "0", *out], "LoRA rank")
    one_error_line(capsys, ["--model", files["model"], "--data", files["prompt"], "--layers", "5-", *out], "layers 0 to 1")
    one_error_line(capsys, ["--model", files["model"], "--data", files["prompt"], "--packing", "--max-len", "0", *out],
                   "packing fills rows of max_len tokens")
    one_error_line(capsys, ["--model", files["model"], "--data", files["prompt"], "--chat-template",
                            str(tmp_path / "t.jinja"), *out], "t.jinja: no such file")


def test_data_with_nothing_to_train_on_stops_before_the_model_loads_in_the_commands_terms(files, capsys, tmp_path,
                                                                                          monkeypatch):
    """An empty file, or one whose every conversation --max-len leaves out: one line naming the file, the
    conversations read and left out and the flag, exit 2, and the model never loaded."""
    def no_load(*a, **kw):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(finetune, "load_model", no_load)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    out = ["--model", files["model"], "--out", str(tmp_path / "out")]
    one_error_line(capsys, [*out, "--data", str(empty)],
                   f"error: --data {empty}: 0 conversations read (the file has no non-blank line): nothing to train on")
    one_error_line(capsys, [*out, "--data", files["messages"], "--max-len", "3"],
                   f"error: --data {files['messages']}: 8 conversations read, all 8 left out by --max-len 3 "
                   "(none keeps an assistant token within that many tokens): nothing to train on; raise --max-len")
    one_error_line(capsys, [*out, "--data", files["messages"], "--max-len", "20", "--overlong", "skip"],
                   "8 conversations read, all 8 left out by --max-len 20 (longer than that, with --overlong skip)")
    one_error_line(capsys, [*out, "--data", files["messages"], "--val", str(empty)], f"error: --val {empty}: 0 conversations")


def test_a_model_without_a_template_is_the_librarys_error_until_one_is_given(files, capsys, tmp_path, smol_tok):
    base = ["--model", files["bare"], "--data", files["messages"], "--max-steps", "1"]
    one_error_line(capsys, [*base, "--out", str(tmp_path / "a")], "has no chat template")
    one_error_line(capsys, [*base, "--out", str(tmp_path / "a")], "--chat-template chatml")
    template = tmp_path / "smollm2.jinja"
    template.write_text(smol_tok.chat_template)
    for flag in ("chatml", str(template)):  # ChatML writes no system prompt; SmolLM2's template adds its own
        log = run(*base, "--chat-template", flag, "--out", str(tmp_path / f"run-{os.path.basename(flag)}"), capsys=capsys)
        assert "replies before training (the first 2 conversations of" in log and "replies after training" in log
    assert os.path.isfile(tmp_path / "run-chatml" / "adapter" / "adapter_model.safetensors")


def test_a_preemption_prints_the_command_that_resumes(files, monkeypatch, capsys):
    def preempted(args):
        raise TrainingInterrupted(signal.SIGTERM, 3, 10, os.path.join(args.out, "checkpoint-3"))

    monkeypatch.setattr(finetune, "run", preempted)
    argv = ["--model", files["model"], "--data", files["messages"], "--out", "runs/x"]
    assert finetune.main(argv) == 143
    script = os.path.relpath(os.path.join(EXAMPLES, "finetune.py"))
    script = script if not script.startswith("..") else os.path.join(EXAMPLES, "finetune.py")
    assert capsys.readouterr().err.strip().splitlines() == [
        f"stopped by SIGTERM after step 3 of 10: checkpoint runs/x/checkpoint-3; resume with: python {script} "
        + " ".join(argv) + " --resume"]


# ---------------------------------------------------------------------------- your own data
def test_the_three_shapes_train_alike_and_packing_fills_rows(files, capsys, smol_tok):
    """The same conversations in each shape give the same adapter, bit for bit; --packing trains on rows of
    whole conversations: the epoch's steps are the rows `train.packing.epoch_rows` lays out."""
    adapters = {}
    for shape in ("messages", "prompt", "alpaca"):
        out = files["root"] / f"run-{shape}"
        log = run("--model", files["model"], "--data", files[shape], "--out", str(out), "--save-every", "100",
                  capsys=capsys)
        assert f"{files[shape]}: 8 conversations, 0 cut" in log and "(4 steps)" in log
        assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint-")) == ["checkpoint-4"]
        adapters[shape] = adapter(out / "adapter")
    first = adapters["messages"]
    assert any(v.abs().sum() > 0 for k, v in first.items() if "lora_B" in k)   # trained: B left zero
    for shape in ("prompt", "alpaca"):
        assert all(torch.equal(first[k], adapters[shape][k]) for k in first)

    lengths = [len(e.input_ids) for e in load_chat_jsonl(files["messages"], smol_tok, 256).examples]
    rows = len(epoch_rows(lengths, 256, DEMO_SEED, 0))   # the default --seed
    assert rows < len(lengths) / 2   # each row holds several conversations
    out = files["root"] / "run-packed"
    log = run("--model", files["model"], "--data", files["messages"], "--out", str(out), "--save-every", "100",
              "--packing", "--max-len", "256", "--batch-size", "1", capsys=capsys)
    assert f"({rows} steps)" in log
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint-")) == [f"checkpoint-{rows}"]


# ---------------------------------------------------------------------------- the embedded default's data
def test_the_diamond_run_writes_adapter_logs_checkpoints_and_its_data_and_resumes_exactly(files, capsys, monkeypatch,
                                                                                           smol_tok):
    out = files["root"] / "diamonds"
    argv = ["--model", files["model"], "--out", str(out), "--max-steps", "4", "--save-every", "2", "--train-size",
            "12", "--val-size", "4", "--test-size", "3"]
    log = run(*argv, capsys=capsys)
    assert "diamonds as a chat (seed 0): 12 train, 4 validation, 3 held out" in log
    assert "before training: 3 held-out diamonds: Error=$" in log and "| after training |" in log
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-4"]
    assert any(f.startswith("events.out.tfevents") for _, _, fs in os.walk(out / "runs") for f in fs)
    ours = adapter(out / "adapter")

    # the adapter loads into the base model (PEFT's layout) and is the last checkpoint's
    model, tok = load_pretrained(files["model"])
    assert len(load_adapter(model, str(out / "adapter"))) == 2 * 7
    assert lora_state_dict(model).keys() == ours.keys()
    assert all(torch.equal(lora_state_dict(model)[k], v) for k, v in ours.items())
    assert all(torch.equal(ours[k], v) for k, v in adapter(out / "checkpoint-4").items())

    # the data written beside the run: the conversations of the split, read back as --data reads them
    split = split_items(load_diamond_chats(), DEMO_SEED, 3, 4, 12)
    written = load_chat_jsonl(str(out / "data" / "train.jsonl"), smol_tok).examples
    assert [(e.input_ids, e.labels) for e in written] == \
        [(e.input_ids, e.labels) for e in (chat_example(smol_tok, c.messages) for c in split.train)]

    # resume: from checkpoint-2 the two steps left, ending with the uninterrupted run's adapter
    shutil.rmtree(out / "checkpoint-4")
    shutil.rmtree(out / "adapter")
    steps = []

    def counted(*a):
        steps.append(a[9])  # training_step(loss_module, micro_batches, ..., autocast, step, scaler)
        return real(*a)

    real = train.loop.training_step
    monkeypatch.setattr(train.loop, "training_step", counted)
    run(*argv, "--resume", capsys=capsys)
    assert steps == [3, 4]
    assert all(torch.equal(ours[k], v) for k, v in adapter(out / "adapter").items())


def test_diamond_chats_label_the_answer_alone_and_the_scorer_reads_it(smol_tok):
    chats = load_diamond_chats()
    rows = load_diamonds(description="four-cs").items
    assert len(chats) == len(rows) == 53_940
    # the held-out diamonds are the pricer demo's: the same split (the demo's seed and sizes) of the same rows
    sizes = [PRESETS["demo"][k] for k in ("test_size", "val_size", "train_size")]
    assert [c.price for c in split_items(chats, DEMO_SEED, *sizes).test] == \
        [i.price for i in split_items(rows, DEMO_SEED, *sizes).test]
    for chat, item in zip(chats[:30], rows[:30]):
        carat, cut, color, clarity = item.prompt.split("\n\n")[1].removeprefix("Diamond: ").split(", ")
        assert [w in chat.question for w in (carat, cut, color, clarity)] == [True] * 4 and chat.question.endswith("?")
        example = chat_example(smol_tok, chat.messages)
        assert labelled_runs(smol_tok, example) == [price_answer(chat.price) + "<|im_end|>"]
    assert price_answer(18_823) == "About $18,823." and price_answer(326.4) == "About $326."
    assert all(parse_price(price_answer(c.price)) == round(c.price) for c in chats)
    assert answer_budget(smol_tok, [c for c in chats if c.price == 18_823]) == len(smol_tok.encode("About $18,823.")) + 1


# ---------------------------------------------------------------------------- replies through the template
def test_replies_are_the_templates_prompt_continued_greedily_up_to_the_end_of_turn(files, smol_tok):
    import transformers

    model, tok = load_pretrained(files["model"])
    reference = transformers.AutoTokenizer.from_pretrained(files["model"])
    assert end_of_turn_ids(tok) == [tok.encode("<|im_end|>")[0]] == [tok.eos_id]
    conversations = [[{"role": "user", "content": q}] for q, _ in PAIRS[:3]]
    conversations[1] = [{"role": "system", "content": "Be brief."}, *conversations[1]]
    n = 5
    replies = chat_replies(model, tok, conversations, n, batch_size=2)
    for conversation, reply in zip(conversations, replies):
        ids = reference.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        new = []
        with torch.no_grad():  # greedy, the whole sequence each step: no cache, no padding
            for _ in range(n):
                new.append(int(model(torch.tensor([ids + new]))[0, -1].argmax()))
        assert tok.eos_id not in new
        assert reply == tok.decode(new)
        stop = new[2]  # a reply stops at the first stop token, which it leaves out
        prompt = tok.apply_chat_template(conversation, add_generation_prompt=True)
        assert continue_prompts(model, tok, [prompt], n, 1, stop_ids=[stop]) == [tok.decode(new[:new.index(stop)])]
