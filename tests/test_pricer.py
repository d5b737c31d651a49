"""examples/: the pricer's data sources, prompt, metrics and both command lines, end to end on a tiny model."""
import csv
import gzip
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, tiny_hf_config

EXAMPLES = os.path.join(ROOT, "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)

from pricer import (  # noqa: E402
    GREEN, ORANGE, RED, PREFIX, QUESTION, color_for, constant_baseline, describe_diamond, load_amazon_meta,
    load_diamonds, load_source, load_text_price, make_answer, make_prompt, parse_price, save_scatter, score,
    scrub, split_items, top_k_average_prices, greedy_and_top_k_prices, greedy_prices,
)
from pricer.data import Item  # noqa: E402

TRAIN_FLAGS = ["--model", "--data", "--out", "--quant", "--r", "--alpha", "--dropout", "--target", "--epochs",
               "--max-steps", "--batch-size", "--grad-accum", "--lr", "--warmup-ratio", "--weight-decay",
               "--optimizer", "--max-len", "--train-size", "--val-size", "--test-size", "--eval-every",
               "--save-every", "--resume", "--seed", "--device", "--preset", "--layers", "--max-grad-norm",
               "--eval-batch-size", "--no-progress", "--compile", "--parallel", "--description", "--top-k-average"]
EVAL_FLAGS = ["--model", "--adapter", "--data", "--n", "--top-k-average", "--out", "--chart", "--quant",
              "--device", "--batch-size", "--max-new-tokens", "--seed", "--description"]


# ---------------------------------------------------------------------------- prompt
def test_prompt_ends_with_price_is_and_answer_has_zero_cents():
    prompt = make_prompt("Diamond: 0.23 carat")
    assert prompt == f"{QUESTION}\n\nDiamond: 0.23 carat\n\n{PREFIX}"
    assert prompt.endswith("Price is $")
    assert make_answer(326.0) == "326.00"
    assert make_answer(1299.6) == "1300.00"
    assert make_answer(12.4) == "12.00"


# ---------------------------------------------------------------------------- diamonds
DIAMOND_HEADER = ["carat", "cut", "color", "clarity", "depth", "table", "price", "x", "y", "z"]


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def test_diamonds_rows_become_items_and_bad_rows_are_counted(tmp_path):
    path = tmp_path / "diamonds.csv"
    write_csv(path, DIAMOND_HEADER, [
        ["0.23", "Ideal", "E", "SI2", "61.5", "55", "326", "3.95", "3.98", "2.43"],
        ["1.5", "Premium", "G", "VS1", "60.1", "58", "12345.6", "7.3", "7.2", "4.4"],
        ["0.3", "Good", "H", "SI1", "63", "57", "", "4.3", "4.3", "2.7"],           # missing price
        ["0.3", "Good", "H", "SI1", "63", "57", "cheap", "4.3", "4.3", "2.7"],      # non-numeric
        ["0.3", "Good", "H", "SI1", "63", "57", "-5", "4.3", "4.3", "2.7"],        # out of range
        ["0.3", "", "H", "SI1", "63", "57", "500", "4.3", "4.3", "2.7"],           # blank field
    ])
    loaded = load_diamonds(str(path))
    assert [i.price for i in loaded.items] == [326.0, 12345.6]
    assert loaded.items[0].prompt == make_prompt(
        "Diamond: 0.23 carat, Ideal cut, color E, clarity SI2, depth 61.5%, table 55%, 3.95 x 3.98 x 2.43 mm")
    assert loaded.items[1].answer == "12346.00"
    assert dict(loaded.skipped) == {"missing price": 1, "non-numeric price": 1, "price out of range": 1,
                                    "empty text": 1}
    assert loaded.summary() == ("diamonds.csv: 2 items, 4 skipped (missing price 1, non-numeric price 1, "
                                "price out of range 1, empty text 1)")


def test_four_cs_description_keeps_carat_cut_color_clarity_only(tmp_path):
    path = tmp_path / "diamonds.csv"
    write_csv(path, DIAMOND_HEADER, [["0.23", "Ideal", "E", "SI2", "61.5", "55", "326", "3.95", "3.98", "2.43"]])
    short = load_diamonds(str(path), description="four-cs").items[0]
    assert short.prompt == make_prompt("Diamond: 0.23 carat, Ideal cut, color E, clarity SI2")
    assert short.price == load_diamonds(str(path)).items[0].price == 326.0
    with pytest.raises(ValueError, match="description 'short'"):
        load_diamonds(str(path), description="short")


def test_diamonds_csv_without_a_price_column_is_a_clear_error(tmp_path):
    path = tmp_path / "d.csv"
    write_csv(path, ["carat", "cut"], [["0.2", "Ideal"]])
    with pytest.raises(ValueError, match=r"d.csv: missing columns .*'price'"):
        load_diamonds(str(path))


def test_embedded_diamonds_load_from_the_plotnine_wheel():
    loaded = load_source(None)
    assert len(loaded.items) == 53940 and not loaded.skipped
    first = loaded.items[0]
    assert first.price == 326.0 and "0.23 carat, Ideal cut, color E, clarity SI2" in first.prompt
    row = dict(carat="1.01", cut="Fair", color="J", clarity="I1", depth="64.5", table="58", x="6.29", y="6.21", z="4.03")
    assert describe_diamond(row) == \
        "Diamond: 1.01 carat, Fair cut, color J, clarity I1, depth 64.5%, table 58%, 6.29 x 6.21 x 4.03 mm"


# ---------------------------------------------------------------------------- Amazon metadata
def word_tokenizer():
    """One token per whitespace-separated word: token counts a reader can check by eye."""
    words: list[str] = []

    class Tok:
        def encode(self, text, bos=False):
            out = []
            for w in text.split():
                words.append(w)
                out.append(len(words) - 1)
            return out

        def decode(self, ids):
            return " ".join(words[i] for i in ids)

    return Tok()


def amazon_record(n_words, price, **overrides):
    record = {
        "title": "Deluxe Widget XJ2000-B Pro",
        "description": [" ".join(f"word{i % 10}x" if i % 7 else "alpha" for i in range(n_words))],
        "features": ["Stainless steel", "Two speeds"],
        "details": {"Brand": "Acme", "Batteries Included?": "No", "Item model number": "AB12345678"},
        "price": price,
    }
    record.update(overrides)
    return record


def test_amazon_meta_is_prepared_as_the_course_prepares_it(tmp_path):
    path = tmp_path / "meta_Appliances.jsonl.gz"
    long, short_words = 200, 20
    lines = [
        json.dumps(amazon_record(long, 19.99)),
        json.dumps(amazon_record(long, None)),            # missing price
        json.dumps(amazon_record(long, "19.99 USD")),     # non-numeric
        json.dumps(amazon_record(long, 1000.0)),          # above 999.49
        json.dumps(amazon_record(long, 0.49)),            # below 0.50
        json.dumps(amazon_record(short_words, 5.0)),      # contents of 300 characters or fewer
        "{not json",                                      # unreadable line
        json.dumps(amazon_record(long, 5.0, title="")),   # empty text
    ]
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    loaded = load_amazon_meta(str(path), word_tokenizer())
    assert dict(loaded.skipped) == {"missing price": 1, "non-numeric price": 1, "price out of range": 2,
                                    "contents of 300 characters or fewer": 1, "unreadable line": 1,
                                    "empty text": 1}
    (item,) = loaded.items
    assert item.price == 19.99 and item.answer == "20.00"
    body = item.prompt[len(QUESTION) + 2:-len("\n\n" + PREFIX)]
    words = body.split(" ")
    assert len(words) == 160                                   # cut to 160 tokens (one word each here)
    assert words[:3] == ["Deluxe", "Widget", "Pro"]            # XJ2000-B: 7+ characters with a digit
    assert "word1x" in words                                   # 6 characters with a digit: kept
    assert not any(ch in body for ch in ':[]"{}【】')


def test_amazon_details_lose_noise_and_part_numbers():
    record = amazon_record(200, 10.0)
    from pricer.data import amazon_text

    text, reason = amazon_text(record, word_tokenizer())
    assert reason is None
    full = "\n".join(["\n".join(record["description"]), "Stainless steel\nTwo speeds"])
    assert text.startswith("Deluxe Widget Pro " + scrub(full)[:30])
    assert scrub('{"Batteries": "No"} ab1234567 12345 【x】') == "Batteries No 12345 x"


def test_amazon_items_of_150_tokens_or_fewer_are_dropped():
    from pricer.data import amazon_text

    tok = word_tokenizer()
    # title 3 words (after scrub) + contents words: find the boundary at exactly 150 tokens
    def tokens_of(n):
        text, reason = amazon_text(amazon_record(n, 10.0, features=[], details={}), tok)
        return reason, (len(text.split()) if text else None)

    counts = {n: tokens_of(n) for n in range(140, 160)}
    kept = [n for n, (reason, _) in counts.items() if reason is None]
    dropped = [n for n, (reason, _) in counts.items() if reason == "150 tokens or fewer"]
    assert kept and dropped and max(dropped) < min(kept)
    assert counts[min(kept)][1] == 151                      # more than 150 tokens: kept, as the course


# ---------------------------------------------------------------------------- text + price files
def test_text_price_jsonl_and_csv_read_the_course_prepared_format(tmp_path):
    course_text = f"{QUESTION}\n\nA kettle, 1.7 litres\n\n{PREFIX}25.00"
    rows = [
        {"text": course_text, "price": 24.99},
        {"text": "Plain description of a lamp", "price": "12.5"},
        {"text": "No price here", "price": None},
        {"text": "Free", "price": 0},
        {"text": "   ", "price": 3.0},
        {"text": "Words", "price": "n/a"},
    ]
    jsonl = tmp_path / "items.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    csv_path = tmp_path / "items.csv"
    write_csv(csv_path, ["text", "price"], [[r["text"], "" if r["price"] is None else r["price"]] for r in rows])
    expected_skips = {"missing price": 1, "price out of range": 1, "empty text": 1, "non-numeric price": 1}
    for path, extra in ((jsonl, {"unreadable line": 1}), (csv_path, {})):
        loaded = load_text_price(str(path))
        assert [i.prompt for i in loaded.items] == [make_prompt("A kettle, 1.7 litres"),
                                                     make_prompt("Plain description of a lamp")]
        assert [i.answer for i in loaded.items] == ["25.00", "12.00"]
        assert dict(loaded.skipped) == {**expected_skips, **extra}
    assert load_source(str(jsonl)).summary().startswith("items.jsonl: 2 items, 5 skipped")


def test_unknown_data_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.csv"):
        load_source(str(tmp_path / "nothing.csv"))
    (tmp_path / "data.parquet").write_text("x")
    with pytest.raises(ValueError, match="unknown data format"):
        load_source(str(tmp_path / "data.parquet"))
    (tmp_path / "meta_Toys.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        load_source(str(tmp_path / "meta_Toys.jsonl"))


# ---------------------------------------------------------------------------- split
def test_split_is_deterministic_disjoint_and_keeps_the_test_set():
    items = [Item(f"p{i}", float(i + 1)) for i in range(100)]
    a = split_items(items, seed=7, test_size=10, val_size=5, train_size=20)
    b = split_items(items, seed=7, test_size=10, val_size=5)
    c = split_items(items, seed=8, test_size=10, val_size=5)
    assert a.test == b.test and a.val == b.val and a.train == b.train[:20]
    assert len(a.train) == 20 and len(b.train) == 85
    ids = [i.prompt for i in a.test + a.val + a.train]
    assert len(set(ids)) == len(ids)
    assert c.test != a.test
    with pytest.raises(ValueError, match="none to train on"):
        split_items(items, seed=0, test_size=60, val_size=40)
    with pytest.raises(ValueError, match="train_size=90"):
        split_items(items, seed=0, test_size=10, val_size=5, train_size=90)


# ---------------------------------------------------------------------------- metrics
def test_parser_reads_the_first_number():
    assert parse_price("$1,299.00") == 1299.0
    assert parse_price("12.5") == 12.5
    assert parse_price("") == 0.0
    assert parse_price("garbage") == 0.0
    assert parse_price("Price is $45.00, or $3 off") == 45.0
    assert parse_price("4523.00</s>") == 4523.0


def test_metrics_equal_their_closed_forms():
    truths = [100.0, 200.0, 1000.0, 50.0, 300.0]
    guesses = [110.0, 150.0, 2000.0, 0.0, 350.0]
    report = score(guesses, truths)
    assert report.errors == [10.0, 50.0, 1000.0, 50.0, 50.0]
    # 10 < 40: green; 50/200 = 25%: orange (< 80); 100%: red; 50 < 80: orange; 50/300 = 16.7%: green
    assert report.colors == [GREEN, ORANGE, RED, ORANGE, GREEN]
    assert report.hit_rate == 40.0
    assert report.mean_error == pytest.approx(1160 / 5)
    sle = [(math.log(101) - math.log(111)) ** 2, (math.log(201) - math.log(151)) ** 2,
           (math.log(1001) - math.log(2001)) ** 2, math.log(51) ** 2, (math.log(301) - math.log(351)) ** 2]
    assert report.rmsle == pytest.approx(math.sqrt(sum(sle) / 5))
    assert report.title() == f"Error=$232.00 RMSLE={math.sqrt(sum(sle) / 5):.2f} Hits=40.0%"
    assert color_for(90, 1000) == GREEN and color_for(300, 1000) == ORANGE and color_for(79, 79) == ORANGE
    assert color_for(80, 100) == RED
    line = report.line(2, color=False)
    assert line.startswith("3: Guess: $2,000.00 Truth: $1,000.00 Error: $1,000.00")
    assert report.line(0).startswith("\033[92m") and report.line(2).startswith("\033[91m")


def test_constant_baseline_guesses_the_mean_training_price():
    base = constant_baseline([100.0, 300.0], [150.0, 250.0, 1000.0])
    assert base.guesses == [200.0, 200.0, 200.0]
    assert base.mean_error == pytest.approx((50 + 50 + 800) / 3)


def test_chart_is_a_png_with_the_course_title(tmp_path):
    report = score([110.0, 150.0, 900.0], [100.0, 200.0, 1000.0])
    path = save_scatter(report, str(tmp_path / "c" / "pricer.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in os.listdir(tmp_path / "c") if p != "pricer.png"]  # no temporary left over


# ---------------------------------------------------------------------------- a tiny model on disk
WORDS = ["How", "much", "does", "this", "cost", "to", "the", "nearest", "dollar", "Price", "is", "Diamond",
         "carat", "cut", "color", "clarity", "Ideal", "Good", "Premium"]


def write_tiny_checkpoint(folder, seed=0):
    """A random tiny Llama as an HF folder: config.json, model.safetensors and a word-level tokenizer.json."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from model import Llama, LlamaConfig

    os.makedirs(folder, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {t: i for i, t in enumerate(specials + list("0123456789") + list(".,?:$") + WORDS)}
    cfg = tiny_hf_config(pad_token_id=3)
    assert len(vocab) <= cfg["vocab_size"]
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.Punctuation()])
    tok.decoder = decoders.Fuse()  # digits join back into numbers: '1','2','.','0' -> '12.0'
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    torch.manual_seed(seed)
    model = Llama(LlamaConfig.from_hf(cfg))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(folder, "model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny")))


def test_one_pass_gives_greedy_decoding_and_the_top_k_average(tiny_checkpoint):
    from model import load_pretrained

    model, tok = load_pretrained(tiny_checkpoint)
    lean = torch.zeros(model.config.vocab_size)   # lean the random model's head toward digits: it writes numbers
    lean[[tok.encode(str(d))[-1] for d in range(10)]] = 4.0
    model.lm_head.register_forward_hook(lambda module, args, logits: logits + lean)
    prompts = [make_prompt(f"Diamond: {i}.{i} carat, {cut} cut") for i in range(4) for cut in ("Ideal", "Fair")]
    greedy, top = greedy_and_top_k_prices(model, tok, prompts, k=3, max_new_tokens=4, batch_size=3)
    assert greedy == greedy_prices(model, tok, prompts, max_new_tokens=4, batch_size=5)[0]
    assert top == top_k_average_prices(model, tok, prompts, k=3, max_new_tokens=4, batch_size=3)
    assert any(g > 0 for g in greedy) and greedy != top   # numbers were read, and the average is not the greedy one


def test_scoring_runs_the_question_once_a_batch_and_answers_as_whole_prompts_do(tiny_checkpoint):
    from model import load_pretrained

    model, tok = load_pretrained(tiny_checkpoint)
    prompts = [make_prompt(f"Diamond: {i}.{i} carat, {cut} cut") for i in range(3) for cut in ("Ideal", "Very Good")]
    rows = []   # (rows, positions) of each call of the decoder
    hook = model.model.register_forward_pre_hook(lambda module, args: rows.append(tuple(args[0].shape)))
    shared = greedy_and_top_k_prices(model, tok, prompts, k=3, max_new_tokens=4, batch_size=4)
    hook.remove()
    longest = max(len(tok.encode(p, bos=True)) for p in prompts)
    question = [n for b, n in rows if b == 1]   # the question, as one row: once for each of the 2 batches
    assert len(question) == 2 and min(question) >= len(tok.encode(QUESTION)) and all(n < longest for _, n in rows)
    whole = greedy_and_top_k_prices(model, tok, prompts, k=3, max_new_tokens=4, batch_size=4, share_prefix=False)
    assert shared[0] == whole[0] and shared[1] == pytest.approx(whole[1], rel=1e-5)
    assert greedy_prices(model, tok, prompts, 4, 4)[1] == greedy_prices(model, tok, prompts, 4, 4, share_prefix=False)[1]


def test_top_k_average_equals_its_definition_item_by_item(tiny_checkpoint):
    from model import load_pretrained

    model, tok = load_pretrained(tiny_checkpoint)
    prompts = [make_prompt(f"Diamond: 0.{i} carat, Ideal cut") for i in range(5)] + [make_prompt("Diamond")]
    k, n_new = 3, 4
    batched = top_k_average_prices(model, tok, prompts, k=k, max_new_tokens=n_new, batch_size=4)
    for prompt, got in zip(prompts, batched):
        ids = torch.tensor([tok.encode(prompt, bos=True)])
        probs = torch.softmax(model(ids)[0, -1].float(), -1)
        p, top = probs.topk(k)
        numbers = []
        for t in top.tolist():
            out = model.generate(torch.tensor([ids[0].tolist() + [t]]), max_new_tokens=n_new - 1,
                                 eos_id=tok.eos_id)
            numbers.append(parse_price(tok.decode([x for x in out[0, ids.shape[1]:].tolist() if x != tok.eos_id])))
        kept = [(x, q) for x, q in zip(numbers, p.tolist()) if x > 0]
        want = sum(x * q for x, q in kept) / sum(q for _, q in kept) if kept else 0.0
        assert got == pytest.approx(want, rel=1e-5)


# ---------------------------------------------------------------------------- the command lines
def run_script(name, *args, cwd):
    env = dict(os.environ, NO_COLOR="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, name), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.parametrize("script,flags", [("train_pricer.py", TRAIN_FLAGS), ("eval_pricer.py", EVAL_FLAGS)])
def test_help_lists_every_flag(script, flags, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(script[:-3], os.path.join(EXAMPLES, script))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit) as done:  # in this process: no second interpreter importing torch
        mod.main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    missing = [f for f in flags if f not in out.split()]
    assert not missing, f"{script} --help lacks {missing}"


def test_presets_fill_unset_flags_and_explicit_flags_win():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_pricer", os.path.join(EXAMPLES, "train_pricer.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    course = mod.parse_args(["--preset", "llama31-8b", "--lr", "3e-4"])
    assert (course.r, course.alpha, course.dropout, course.lr, course.weight_decay, course.max_grad_norm) == \
        (32, 64, 0.1, 3e-4, 0.001, 0.3)
    assert (course.target, course.optimizer, course.max_len, course.batch_size, course.group_by_length) == \
        ("q_proj,k_proj,v_proj,o_proj", "paged_adamw", 182, 4, True)
    assert (course.save_every, course.keep_last, course.warmup_ratio) == (5000, 10, 0.03)
    demo = mod.parse_args([])
    assert demo.quant == "nf4" and demo.test_size == 200 and demo.preset == "demo"
    assert (demo.description, demo.layers, demo.batch_size, demo.max_steps) == ("four-cs", "20-", 2, 1100)
    assert (demo.r, demo.alpha, demo.top_k_average) == (8, 8, 3)   # the lab's choice: alpha / r = 1
    full = mod.parse_args(["--preset", "demo-full"])   # the first demo, before it was made faster
    assert (full.description, full.layers, full.batch_size, full.max_steps) == ("full", "15-", 8, 500)
    assert mod.parse_args(["--description", "full"]).description == "full"
    # the lab's base: the recipe every experiment of examples/lab.py changes; the base's 4-bit type and dtype
    lab = mod.parse_args(["--preset", "lab", "--no-double-quant", "--dtype", "bfloat16"])
    assert (lab.description, lab.layers, lab.batch_size, lab.max_steps, lab.r, lab.alpha) == ("four-cs", "20-", 2, 1100, 8, 16)
    assert (lab.double_quant, lab.dtype, demo.double_quant, demo.dtype) == (False, "bfloat16", True, None)
    assert mod.base_dtype(lab, "cpu") == torch.bfloat16 and mod.base_dtype(demo, "cpu") is None
    from pricer import parse_layers
    assert parse_layers("15-", 30) == tuple(range(15, 30)) and parse_layers("all", 30) is None
    with pytest.raises(ValueError, match="layers 0 to 29"):
        parse_layers("28-31", 30)


def test_two_training_steps_write_an_adapter_that_eval_loads(tiny_checkpoint, tmp_path):
    data = tmp_path / "items.csv"
    write_csv(data, ["text", "price"],
              [[f"Diamond: 0.{i} carat, {['Ideal', 'Good'][i % 2]} cut", 100 + 37 * i] for i in range(16)])
    out = tmp_path / "run"
    log = run_script("train_pricer.py", "--model", tiny_checkpoint, "--data", str(data), "--out", str(out),
                     "--max-steps", "2", "--batch-size", "4", "--train-size", "8", "--val-size", "4",
                     "--test-size", "4", "--save-every", "1", "--r", "4", "--alpha", "8", "--layers", "all",
                     "--lr", "1e-2", "--device", "cpu", "--no-progress", cwd=tmp_path)
    assert "items.csv: 16 items, 0 skipped" in log
    assert "8 train, 4 validation, 4 test" in log
    assert "trainable" in log and "| after training |" in log and "| after training, top-3 average |" in log
    adapter = out / "adapter"
    assert sorted(os.listdir(adapter)) == ["adapter_config.json", "adapter_model.safetensors", "trained_on.json"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8, "LORA")
    split = json.loads((adapter / "trained_on.json").read_text())["split"]
    assert (split["train_size"], split["val_size"], split["test_size"]) == (8, 4, 4)
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint-")) == ["checkpoint-1", "checkpoint-2"]
    assert (out / "pricer.png").is_file() and os.listdir(out / "runs")

    from safetensors.torch import load_file

    saved = load_file(str(adapter / "adapter_model.safetensors"))
    assert len(saved) == 2 * 7 * 2 and any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)

    chart = tmp_path / "eval.png"
    log = run_script("eval_pricer.py", "--adapter", str(adapter), "--model", tiny_checkpoint, "--data", str(data),
                     "--n", "4", "--chart", str(chart), "--out", str(tmp_path / "eval"), "--device", "cpu",
                     cwd=tmp_path)
    assert f"adapter {adapter}: LoRA on 14 modules" in log
    assert "4 items, greedy" in log and "| with adapter |" in log
    assert chart.is_file()
    log = run_script("eval_pricer.py", "--adapter", str(adapter), "--data", str(data), "--n", "3",
                     "--top-k-average", "2", "--out", str(tmp_path / "eval2"), "--device", "cpu", cwd=tmp_path)
    assert f"loaded {tiny_checkpoint}" in log  # the adapter names its base model
    assert "3 items, top-2 average" in log
