"""Chat templates and assistant-only labels, against transformers' `apply_chat_template`.

The templates are the models' own (tests/data/chat_templates/, and SmolLM2's inside its GGUF); the
vocabularies are llama.cpp's vocabulary-only GGUFs (`.venv/llama.cpp/models/`, which `make test`
unpacks from the llama-cpp-python source distribution): Llama 3's, Qwen2's and Phi-3's, through our
`Tokenizer.from_gguf`. transformers' tokenizer of the same vocabulary is the reference: loaded from
our `save_pretrained` folder (a `tokenizer.json`) for the byte-level BPE ones, and by transformers'
own GGUF loader for Phi-3's sentencepiece vocabulary. No Gemma nor Mistral Nemo vocabulary is at
hand: their templates run on Llama 3's and Qwen2's vocabularies with the templates' own turn
tokens (`<start_of_turn>`, `<end_of_turn>`; `[INST]`, `[/INST]`) added as special tokens.
"""
import json
import os
import re
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import transformers  # noqa: E402
from conftest import labelled_runs, tiny_hf_config  # noqa: E402
from tokenizers import AddedToken  # noqa: E402

from model import CHATML, ChatTemplateError, Tokenizer, default_checkpoint  # noqa: E402
from train import IGNORE_INDEX, chat_example, load_chat_jsonl, read_jsonl_conversations  # noqa: E402

# llama.cpp's models/ folder, resolved from the repository root (make test unpacks it there)
MODELS = os.path.join(ROOT, ".venv", "llama.cpp", "models")
TEMPLATES = os.path.join(HERE, "data", "chat_templates")
LLAMA31, QWEN25, QWEN3, GEMMA2, PHI35, NEMO = (
    "meta-llama-Llama-3.1-8B-Instruct.jinja", "Qwen-Qwen2.5-7B-Instruct.jinja", "Qwen-Qwen3-0.6B.jinja",
    "google-gemma-2-2b-it.jinja", "microsoft-Phi-3.5-mini-instruct.jinja", "mistralai-Mistral-Nemo-Instruct-2407.jinja")
# (vocabulary, template file; None: the one inside the GGUF)
CASES = {
    "smollm2": ("smollm2", None), "llama3.1": ("llama-bpe", LLAMA31), "qwen2.5": ("qwen2", QWEN25),
    "qwen3": ("qwen2", QWEN3), "gemma2": ("llama-bpe", GEMMA2), "phi3.5": ("phi-3", PHI35), "nemo": ("qwen2", NEMO),
}
EXTRA_SPECIAL = {"llama-bpe": ["<start_of_turn>", "<end_of_turn>"], "qwen2": ["[INST]", "[/INST]"]}

SYSTEM = {"role": "system", "content": "You are a terse assistant. Answer in one line."}
TURNS = [
    ("What is 2+2?", "4"),
    ("  And in words?\n", " Four.\n"),                                  # spaces some templates trim
    ("Prices: €12.50, 日本語, 😀 and\n\nnew lines", "Noted:\n- €12.50\n- ok!"),
]


def conversation(n_turns: int, system: bool, generation: bool = False) -> list[dict]:
    """n user/assistant turns (the last assistant left out when `generation`), a system message first."""
    messages = [SYSTEM] if system else []
    for user, assistant in TURNS[:n_turns]:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return messages[:-1] if generation else messages


def template(name: str | None) -> str | None:
    if name is None:
        return None
    with open(os.path.join(TEMPLATES, name), encoding="utf-8") as f:
        return f.read()


def vocab_path(name: str) -> str:
    path = os.path.join(MODELS, f"ggml-vocab-{name}.gguf")
    if not os.path.isfile(path):
        pytest.fail(f"{path} is missing: `make .venv/llama.cpp/models/.unpacked` (part of `make test`) unpacks it")
    return path


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict:
    """vocabulary name -> (our Tokenizer, transformers' tokenizer of the same vocabulary)."""
    pairs = {}
    for name in ("smollm2", "llama-bpe", "qwen2", "phi-3"):
        ours = Tokenizer.from_gguf(default_checkpoint() if name == "smollm2" else vocab_path(name))
        if name in EXTRA_SPECIAL:
            ours.backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in EXTRA_SPECIAL[name]])
        if name == "phi-3":  # sentencepiece: transformers' own GGUF loader builds the reference
            ref = transformers.AutoTokenizer.from_pretrained(MODELS, gguf_file="ggml-vocab-phi-3.gguf")
        else:
            folder = str(tmp_path_factory.mktemp(name))
            ours.save_pretrained(folder)
            ref = transformers.AutoTokenizer.from_pretrained(folder)
        pairs[name] = ours, ref
    return pairs


def reference_ids(ref, messages, generation: bool, chat_template: str | None, **kwargs) -> list[int]:
    return ref.apply_chat_template(messages, chat_template=chat_template, tokenize=True,
                                   add_generation_prompt=generation, return_dict=False, **kwargs)


# ------------------------------------------------------------------------------------------ the template
@pytest.mark.parametrize("case", list(CASES))
def test_apply_chat_template_ids_equal_transformers(case, tokenizers):
    vocab, file = CASES[case]
    ours, ref = tokenizers[vocab]
    chat_template = template(file)
    compared = 0
    for n_turns in (1, 2, 3):
        for system in (False, True):
            for generation in (False, True):
                messages = conversation(n_turns, system, generation)
                try:
                    expected = reference_ids(ref, messages, generation, chat_template)
                except Exception as e:  # the template refuses it (Gemma 2: no system role): so must ours
                    with pytest.raises(ChatTemplateError, match=re.escape(str(e))):
                        ours.apply_chat_template(messages, generation, chat_template=chat_template)
                    continue
                ids = ours.apply_chat_template(messages, add_generation_prompt=generation, chat_template=chat_template)
                assert ids == expected, (case, n_turns, system, generation, ours.decode(ids), ref.decode(expected))
                compared += 1
    assert compared >= 6  # Gemma 2 refuses the six with a system message


def test_the_template_reaches_the_text(tokenizers):
    """Not a plain join of the contents: the model's own headers and end-of-turn tokens are there."""
    ours, _ = tokenizers["llama-bpe"]
    text = ours.render_chat(conversation(1, True), chat_template=template(LLAMA31))
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
                    "December 2023\nToday Date: 26 Jul 2024\n\nYou are a terse assistant. Answer in one line.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>")


def test_template_kwargs_reach_the_template(tokenizers):
    ours, ref = tokenizers["qwen2"]
    messages = conversation(1, False, generation=True)
    ids = ours.apply_chat_template(messages, True, chat_template=template(QWEN3), enable_thinking=False)
    assert ids == reference_ids(ref, messages, True, template(QWEN3), enable_thinking=False)
    assert ours.decode(ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_whitespace_control_tojson_and_loop_controls_behave_as_in_transformers(tokenizers):
    ours, ref = tokenizers["smollm2"]
    probe = ("{% for m in messages %}\n    {% if loop.index > 2 %}\n        {% break %}\n    {% endif %}\n"
             "{{ m | tojson }}\n{% endfor %}\n{{ messages[0] | tojson(indent=2) }}{{ bos_token }}{{ eos_token }}\n"
             "{% set ns = namespace(n=0) %}{% set ns.n = ns.n + 1 %}{{ ns.n }} {{ strftime_now('%Y-%m') }}")
    messages = [{"role": "user", "content": "<b>é & \"quotes\"</b>"}, {"role": "assistant", "content": None,
                                                                        "reasoning": "thinking"},
                {"role": "user", "content": "third"}]
    assert ours.render_chat(messages, chat_template=probe) == ref.apply_chat_template(
        messages, chat_template=probe, tokenize=False)


def test_raise_exception_becomes_a_chat_template_error(tokenizers):
    ours, ref = tokenizers["llama-bpe"]
    messages = [{"role": "assistant", "content": "I speak first"}]
    with pytest.raises(Exception) as theirs:
        ref.apply_chat_template(messages, chat_template=template(GEMMA2))
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate") as e:
        ours.apply_chat_template(messages, chat_template=template(GEMMA2))
    assert str(theirs.value) in str(e.value)


# ------------------------------------------------------------------------------------------ where it is read
def test_gguf_folder_and_saved_folder_carry_the_template(tokenizers, tmp_path):
    from model.gguf import read_gguf_kv

    ours, ref = tokenizers["smollm2"]
    assert ours.chat_template == read_gguf_kv(default_checkpoint())["tokenizer.chat_template"]
    assert ref.chat_template == ours.chat_template                     # save_pretrained wrote it
    ours.save_pretrained(str(tmp_path / "a"))
    assert Tokenizer.from_folder(str(tmp_path / "a")).chat_template == ours.chat_template


def test_folder_template_sources(tmp_path, tokenizers):
    ours, _ = tokenizers["smollm2"]
    folder = tmp_path / "f"
    ours.save_pretrained(str(folder))
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    config_file.write_text(json.dumps(config))
    assert Tokenizer.from_folder(str(folder)).chat_template == "D"     # HF's list of named templates
    (folder / "chat_template.jinja").write_text("J")
    assert Tokenizer.from_folder(str(folder)).chat_template == "J"     # chat_template.jinja comes first
    ref = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert ref.chat_template == "J"
    (folder / "chat_template.jinja").unlink()
    config["chat_template"] = [{"name": "tool_use", "template": "T"}]
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: chat_template lists templates \['tool_use'\]"):
        Tokenizer.from_folder(str(folder))


def test_sentencepiece_in_a_folder_takes_its_template(tokenizers, tmp_path):
    ours, ref = tokenizers["phi-3"]
    assert ours.chat_template is not None and ours.chat_template == ref.chat_template  # the GGUF's own
    ours.save_pretrained(str(tmp_path))
    again = Tokenizer.from_sentencepiece(str(tmp_path / "tokenizer.model"))
    assert again.chat_template == ours.chat_template and again.source == str(tmp_path)


def test_no_template_is_a_clear_error_and_chatml_only_on_request(tokenizers):
    ours, _ = tokenizers["llama-bpe"]
    assert ours.chat_template is None                                   # Llama 3's vocabulary file has none
    with pytest.raises(ValueError, match=r"ggml-vocab-llama-bpe\.gguf: the model has no chat template.*CHATML"):
        ours.apply_chat_template(conversation(1, False))
    text = ours.render_chat(conversation(1, False), chat_template=CHATML)
    assert text == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"


# ------------------------------------------------------------------------------------------ the vocabularies
@pytest.mark.parametrize("name", ["llama-bpe", "qwen2", "phi-3"])
def test_vocabularies_tokenize_llama_cpps_test_texts_to_its_ids(name, tokenizers):
    """llama.cpp ships each vocabulary with texts (.inp) and the ids its reference tokenizer gives
    them (.out): Qwen2's digits one by one, Llama 3's whole-word tokens, Phi-3's sentencepiece pieces."""
    ours, _ = tokenizers[name]
    path = vocab_path(name)
    with open(path + ".inp", encoding="utf-8") as f:
        texts = f.read().split("\n__ggml_vocab_test__\n")
    with open(path + ".out", encoding="utf-8") as f:
        expected = [[int(i) for i in line.split()] for line in f.read().split("\n")]
    assert len(texts) == len(expected) > 40
    for text, ids in zip(texts, expected):
        assert ours.encode(text) == ids, text
        got, offsets = ours.encode_with_offsets(text)
        assert got == ids and len(offsets) == len(ids)
        assert all(0 <= lo <= hi <= len(text) for lo, hi in offsets)


# ------------------------------------------------------------------------------------------ assistant-only labels
# What each template writes after an assistant's content to close the turn, and whether it trims the content
END_OF_TURN = {"smollm2": "<|im_end|>", "llama3.1": "<|eot_id|>", "qwen2.5": "<|im_end|>", "qwen3": "<|im_end|>",
               "gemma2": "<end_of_turn>", "phi3.5": "<|end|>", "nemo": "<|endoftext|>"}  # nemo: eos of Qwen2's vocabulary
TRIMS = {"llama3.1", "gemma2"}


@pytest.mark.parametrize("case", list(CASES))
def test_labels_are_the_assistant_contents_and_their_end_of_turn(case, tokenizers):
    vocab, file = CASES[case]
    ours, ref = tokenizers[vocab]
    chat_template = template(file)
    tok = ours if chat_template is None else with_template(ours, chat_template)
    messages = conversation(3, system=case != "gemma2")   # three turns; Gemma 2 has no system role
    example = chat_example(tok, messages)
    assert example.input_ids == reference_ids(ref, messages, False, chat_template)
    assert all(y in (IGNORE_INDEX, t) for t, y in zip(example.input_ids, example.labels))
    contents = [m["content"].strip() if case in TRIMS else m["content"] for m in messages if m["role"] == "assistant"]
    assert labelled_runs(tok, example) == [c + END_OF_TURN[case] for c in contents]


def with_template(tok: Tokenizer, chat_template: str) -> Tokenizer:
    """The same tokenizer with another template (a shallow copy: the vocabulary is shared)."""
    import copy

    other = copy.copy(tok)
    other.chat_template = chat_template
    return other


def test_chat_example_cuts_to_max_len_and_refuses_malformed_conversations(tokenizers):
    tok, _ = tokenizers["smollm2"]
    full = chat_example(tok, conversation(2, True))
    cut = chat_example(tok, conversation(2, True), max_len=20)
    assert cut.input_ids == full.input_ids[:20] and cut.labels == full.labels[:20]
    for messages, error in [([], "empty"), ("hi", "list of messages"), ([{"content": "x"}], "message 0 has no 'role'"),
                            ([{"role": "user"}], r"message 0 \(user\) has no 'content'"),
                            ([{"role": "user", "content": "hi"}], "no assistant message")]:
        with pytest.raises(ValueError, match=error):
            chat_example(tok, messages)
    twice = "{% for m in messages %}{{ m['content'] }}|{{ m['content'] }}{% endfor %}"
    with pytest.raises(ValueError, match="writes an assistant's content 2 times"):
        chat_example(with_template(tok, twice), conversation(1, False))


# ------------------------------------------------------------------------------------------ training on Examples
@pytest.fixture(scope="module")
def smollm2_vocab_model():
    """A tiny random Llama over SmolLM2's 49,152 token ids, with LoRA (no dropout)."""
    import torch

    from lora import LoRAConfig, apply_lora
    from model import Llama, LlamaConfig

    torch.manual_seed(0)
    model = Llama(LlamaConfig.from_hf(tiny_hf_config(vocab_size=49152)))
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj")))
    return model


def test_train_takes_examples_and_learns_their_labels(tokenizers, smollm2_vocab_model):
    import copy

    import torch

    from train import TrainConfig, collate, evaluate, train

    tok, _ = tokenizers["smollm2"]
    examples = [chat_example(tok, conversation(n, system)) for n in (1, 2) for system in (False, True)]
    model = copy.deepcopy(smollm2_vocab_model)
    batch = collate(examples, tok.pad_id)
    with torch.no_grad():  # the reference: cross-entropy over every logit, on the labels as chat_example set them
        logits = model(batch["input_ids"])
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
    assert abs(evaluate(model, examples) - expected.item()) < 1e-5
    config = TrainConfig(lr=1e-3, max_steps=1, batch_size=4, warmup_steps=0, progress=False)
    result = train(model, tok, examples, examples, config)
    assert abs(result.train_losses[0][1] - expected.item()) < 1e-5   # step 1's loss: before its update
    assert result.val_losses[-1][1] < result.train_losses[0][1]      # one step on them lowered it

    unlabelled = chat_example(tok, conversation(1, False), max_len=3)   # cut before the assistant's turn
    mixed = [("How much is it?", "12.00"), *examples, unlabelled]
    with pytest.warns(UserWarning, match="1 of 5 examples have no label to learn"):
        result = train(copy.deepcopy(smollm2_vocab_model), tok, mixed, None, config)
    assert result.skipped_items == 1


# ------------------------------------------------------------------------------------------ JSON Lines files
def write_lines(path, lines) -> str:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)
                              for line in lines) + "\n", encoding="utf-8")
    return str(path)


def test_jsonl_reads_the_three_shapes_into_examples(tokenizers, tmp_path):
    tok, _ = tokenizers["smollm2"]
    chat = conversation(2, True)
    path = write_lines(tmp_path / "d.jsonl", [
        {"messages": chat, "id": 7, "source": "extra keys are ignored"},
        "",
        {"prompt": "What is 2+2?", "completion": "4"},
        {"instruction": "Add the numbers.", "input": "2 and 2", "output": "4", "system": "Be brief."},
        {"instruction": "Say hi.", "input": "  ", "output": "hi"},
        {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello"}]},
    ])
    expected = [chat,
                [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
                [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add the numbers.\n\n2 and 2"},
                 {"role": "assistant", "content": "4"}],
                [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}],
                [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]]
    read = list(read_jsonl_conversations(path))
    assert [n for n, _ in read] == [1, 3, 4, 5, 6] and [m for _, m in read] == expected
    data = load_chat_jsonl(path, tok)
    assert (data.truncated, data.skipped) == (0, 0)
    assert [(e.input_ids, e.labels) for e in data.examples] == [
        (e.input_ids, e.labels) for e in (chat_example(tok, m) for m in expected)]


BAD_LINES = [  # (line, what the error says after path:line:)
    ('{"prompt": "a", "completion": "b"', "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ({"text": "hello"}, r"expected 'messages', 'prompt' and 'completion', or 'instruction' and 'output'; .*\['text'\]"),
    ({"prompt": "a"}, "missing key 'completion'"),
    ({"instruction": "a", "input": "b"}, "missing key 'output'"),
    ({"prompt": "a", "completion": 3}, "'completion' must be a string, got int"),
    ({"messages": []}, "the conversation is empty"),
    ({"messages": [{"content": "hi"}, {"role": "assistant", "content": "x"}]}, "message 0 has no 'role'"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, r"message 0 \(user\) has no 'content'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "the conversation has no assistant message"),
    ({"messages": [SYSTEM, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]},
     "chat template: System role not supported"),        # Gemma 2's template refuses a system message
]


@pytest.mark.parametrize("bad,error", BAD_LINES)
def test_a_bad_line_names_its_file_and_line(bad, error, tokenizers, tmp_path):
    tok = with_template(tokenizers["smollm2"][0], template(GEMMA2))
    good = {"prompt": "What is 2+2?", "completion": "4"}
    path = write_lines(tmp_path / "bad.jsonl", [good, "", good, bad, good])
    with pytest.raises(ValueError, match=re.escape(path) + ":4: " + error):
        load_chat_jsonl(path, tok)


def test_jsonl_overlong_conversations_are_cut_or_skipped_and_counted(tokenizers, tmp_path):
    tok, _ = tokenizers["smollm2"]
    lines = [{"messages": conversation(n, True)} for n in (1, 2, 3)] + [{"prompt": "x " * 50, "completion": "y"}]
    path = write_lines(tmp_path / "long.jsonl", lines)
    lengths = [len(e.input_ids) for e in load_chat_jsonl(path, tok).examples]
    max_len = sorted(lengths)[1]                                     # two fit, two are longer
    skipped = load_chat_jsonl(path, tok, max_len=max_len, overlong="skip")
    assert (skipped.truncated, skipped.skipped, len(skipped.examples)) == (0, 2, 2)
    cut = load_chat_jsonl(path, tok, max_len=max_len, overlong="truncate")
    # the long prompt leaves no assistant token within max_len: skipped even when truncating
    assert (cut.truncated, cut.skipped, len(cut.examples)) == (1, 1, 3)
    assert max(len(e.input_ids) for e in cut.examples) == max_len
    with pytest.raises(ValueError, match="overlong must be one of"):
        load_chat_jsonl(path, tok, overlong="drop")
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl: no such file"):
        load_chat_jsonl(str(tmp_path / "nowhere.jsonl"), tok)
