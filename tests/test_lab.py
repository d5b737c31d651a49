"""examples/lab.py: every experiment end to end on a tiny random Llama (`--tiny`): runs, rows, numbers, resuming."""
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys

import pytest

from conftest import ROOT
from test_pricer import write_tiny_checkpoint

EXAMPLES = os.path.join(ROOT, "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)

import lab  # noqa: E402
from pricer import PRESETS  # noqa: E402
import labclaims  # noqa: E402
import labepochs  # noqa: E402
import labruns  # noqa: E402
import labsweeps  # noqa: E402

TRAINING = ["rank", "alpha", "targets", "qlora", "epochs"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_lab")))


@pytest.fixture(scope="module")
def out(tiny, tmp_path_factory):
    """Every training experiment in one command, one seed: their runs share one queue."""
    folder = tmp_path_factory.mktemp("lab_out")
    assert lab.main([*TRAINING, "--tiny", "--model", tiny, "--out", str(folder), "--seeds", "1"]) == 0
    return folder


def fragment_and_data(name, tiny, out):
    assert (out / f"{name}.png").stat().st_size > 1000
    fragment = (out / f"{name}.md").read_text()
    assert f"Command: `python examples/lab.py {name}" in fragment and f"--model {tiny}" in fragment
    assert f"![{name}]" in fragment
    return fragment, json.loads((out / f"{name}.json").read_text())


def table_rows(fragment, table=0):
    """The cells of the fragment's `table`-th Markdown table, its header and rule dropped."""
    tables, current = [], []
    for line in fragment.splitlines() + [""]:
        if line.startswith("| "):
            current.append([c.strip() for c in line.strip("|").split("|")])
        elif current:
            tables, current = tables + [current[2:]], []
    return tables[table]


def test_rank_rows_both_alphas_and_parameters_grow_with_r(tiny, out):
    fragment, data = fragment_and_data("rank", tiny, out)
    rows = table_rows(fragment)
    assert [(int(r[0]), int(r[1])) for r in rows] == \
        [(r, 2 * r) for r in labsweeps.RANKS] + [(r, labsweeps.FIXED_ALPHA) for r in labsweeps.RANKS]
    counts = [data[f"r={r}, alpha={2 * r}"]["trainable"] for r in labsweeps.RANKS]
    # A is r x in and B is out x r: the count is r times a constant, and fp32 adapters take 4 bytes each
    assert len({n // r for n, r in zip(counts, labsweeps.RANKS)}) == 1 and all(n % r == 0 for n, r in zip(counts, labsweeps.RANKS))
    assert [data[f"r={r}, alpha={2 * r}"]["adapter_bytes"] for r in labsweeps.RANKS] == [4 * n for n in counts]
    row = data["r=8, alpha=16"]
    assert row["greedy.hit_rate"]["n"] == 1 and 0 <= row["greedy.hit_rate"]["mean"] <= 100


def test_alpha_changes_the_update_and_not_the_parameters(tiny, out):
    fragment, data = fragment_and_data("alpha", tiny, out)
    assert [int(row[0]) for row in table_rows(fragment)] == list(labsweeps.ALPHAS)
    assert len({row["trainable"] for row in data.values()}) == 1
    runs = [labruns.load_result(s, str(out)) for s in lab.SPECS["alpha"](lab_of(tiny, out))]
    # B starts at zero and the warmup's first learning rate is 0, so steps 1 and 2 see the base model
    # for every alpha; step 3 follows the first real update, whose effect is scaled by alpha / r
    second = {r["train_curve"][1][1] for r in runs}
    third = {r["train_curve"][2][1] for r in runs}
    assert len(second) == 1 and len(third) == len(labsweeps.ALPHAS)


def lab_of(tiny, out, seeds=1):
    return lab.Lab(tiny, lab.TINY, str(out), seeds=tuple(range(seeds)))


def test_targets_attention_plus_mlp_is_all_seven_and_all_layers_is_more(tiny, out):
    fragment, data = fragment_and_data("targets", tiny, out)
    attention, mlp, upper, lower, everywhere = (row["trainable"] for row in data.values())
    assert attention + mlp == upper and lower == upper and everywhere == 2 * upper  # 2 layers: a third is 1
    assert [row[1] for row in table_rows(fragment)][2:] == ["upper third (1-)", "lower third (0-0)", "all layers"]


def held_bytes(n: int, double_quant: bool) -> float:
    """Closed form for one Linear4bit of n weights: packed codes, scales, code books (quant/linear4bit.py)."""
    if not double_quant:
        return n / 2 + 4 * n / 64 + 16 * 4
    # uint8 codes, fp32 nested scale per 256 blocks, 256-value nested map, offset, decoded fp32 scales, code book
    return n / 2 + n / 64 + 4 * math.ceil(n / 64 / 256) + 256 * 4 + 4 + 4 * n / 64 + 16 * 4


def test_qlora_compares_the_bases_and_measures_what_each_holds(tiny, out):
    fragment, data = fragment_and_data("qlora", tiny, out)
    labels = [row[0] for row in table_rows(fragment)]
    assert labels[:4] == ["NF4, double quantization (QLoRA)", "NF4, no double quantization", "FP4, double quantization",
                          "unquantized, fp32"]
    assert labels[4:] == (["unquantized, bf16"] if labsweeps.has_bf16() else [])
    from model import read_config

    c = read_config(tiny)
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    sizes = [c.hidden_size * q, c.hidden_size * kv, c.hidden_size * kv, q * c.hidden_size,
             *[c.hidden_size * c.intermediate_size] * 3] * c.num_hidden_layers
    memory = {label: row["base_memory"] for label, row in data.items()}
    assert memory["NF4, double quantization (QLoRA)"]["projection_bytes"] == sum(held_bytes(n, True) for n in sizes)
    assert memory["NF4, no double quantization"]["projection_bytes"] == sum(held_bytes(n, False) for n in sizes)
    assert memory["unquantized, fp32"]["bits_per_weight"] == 32.0
    if labsweeps.has_bf16():
        assert memory["unquantized, bf16"]["bits_per_weight"] == 16.0
    # the base recipe is one run, shared: qlora's NF4 row is rank's r = 8, alpha = 16 row
    rank = json.loads((out / "rank.json").read_text())
    assert data["NF4, double quantization (QLoRA)"]["runs"] == rank["r=8, alpha=16"]["runs"]


def test_epochs_each_set_each_seed_with_validation_every_step(tiny, out):
    fragment, data = fragment_and_data("epochs", tiny, out)
    rows = table_rows(fragment)
    assert [(r[0], r[1]) for r in rows] == [(f"{lab.TINY.small_set} diamonds", "0"), (f"{lab.TINY.large_set} diamonds", "0")]
    for name, n in (("small", lab.TINY.small_set), ("large", lab.TINY.large_set)):
        curves = data[name]["curves"][0]
        per_epoch = -(-n // 2)
        steps, every = lab.TINY.n_epochs * per_epoch, per_epoch // labepochs.EVALS_PER_EPOCH
        assert [s for s, _ in curves["train"]] == list(range(1, steps + 1))
        assert [s for s, _ in curves["val"]] == list(range(every, steps + 1, every))  # a few times an epoch
        assert len(data[name]["seeds"][0]["drops"]) == lab.TINY.n_epochs - 1
    assert "diamonds: the training loss drops as epoch 2 starts" in fragment


def test_stored_runs_are_not_run_again_and_a_lost_one_is(tiny, out, capsys):
    files = sorted(os.listdir(out / "runs"))
    # one file per distinct recipe and seed: rank 12 - 0, alpha 6 - 1, targets 5 - 1, qlora 4 or 5 - 1, epochs 2
    assert len(files) == 11 + 5 + 4 + (4 if labsweeps.has_bf16() else 3) + 2
    capsys.readouterr()
    assert lab.main([*TRAINING, "--tiny", "--model", tiny, "--out", str(out), "--seeds", "1", "--plan"]) == 0
    assert f"{len(files)} stored, 0 to do" in capsys.readouterr().out
    os.remove(out / "runs" / files[0])
    written = {f: os.stat(out / "runs" / f).st_mtime_ns for f in files[1:]}
    assert lab.main(["alpha", "rank", "--tiny", "--model", tiny, "--out", str(out), "--seeds", "1"]) == 0
    assert "1 run(s) to do" in capsys.readouterr().out and sorted(os.listdir(out / "runs")) == files
    assert {f: os.stat(out / "runs" / f).st_mtime_ns for f in files[1:]} == written  # the stored ones untouched


def test_two_processes_give_the_numbers_of_one(tiny, tmp_path):
    lab_ = lab_of(tiny, tmp_path, seeds=2)
    specs = lab_.specs("pair", lab_.settings())
    parallel = labruns.run_all(specs, str(tmp_path / "two"), jobs=2)
    for spec in specs:
        alone = labruns.run_one(spec, out=None)
        assert parallel[spec.key]["train_curve"] == alone["train_curve"]
        assert parallel[spec.key]["greedy"] == alone["greedy"]
    # seeds 0 and 1: another order and initialisation, and another split (the constant guess scores differently)
    assert parallel[specs[0].key]["train_curve"] != parallel[specs[1].key]["train_curve"]
    assert parallel[specs[0].key]["constant"] != parallel[specs[1].key]["constant"]


def test_seed_twice_is_identical_and_another_seed_is_not(tiny, tmp_path):
    assert lab.main(["seed", "--tiny", "--model", tiny, "--out", str(tmp_path)]) == 0
    fragment, data = fragment_and_data("seed", tiny, tmp_path)
    first, again, other = data["curves"]
    assert first == again and first != other
    assert "Maximum difference between the two seed-42 curves: 0.0." in fragment


def test_nf4_compares_three_formats_and_measures_bits_on_disk_and_held(tiny, tmp_path):
    assert lab.main(["nf4", "--tiny", "--model", tiny, "--out", str(tmp_path)]) == 0
    fragment, data = fragment_and_data("nf4", tiny, tmp_path)
    header = [line for line in fragment.splitlines() if line.startswith("| weights")][0]
    assert "NF4" in header and "FP4" in header and "int4 (absmax, 15 levels)" in header
    assert [row[0] for row in table_rows(fragment)][-2:] == ["all real matrices", "N(0,1) control"]
    # closed form: 4 bits + one fp32 absmax per 64 weights = 4.5; double quantization stores it in 8 bits
    # per block plus an fp32 scale per 256 blocks and one fp32 offset
    disk, held = data["bits_per_parameter"], data["bits_held"]
    assert disk["without double quantization"] == pytest.approx(4.5)
    assert 4 + 8 / 64 < disk["with double quantization"] < 4.5
    # held, as the qlora table counts it (labruns.held_bytes): the code books, 16 fp32 levels (and the 256-value
    # nested map with double quantization) a matrix, and the fp32 scales Linear4bit decodes once, 32 bits per
    # block of 64 weights, beside the codes: double quantization costs memory while training
    books = 8 * 4 * data["projections"] / data["projection_weights"]
    assert held["without double quantization"] - disk["without double quantization"] == pytest.approx(16 * books)
    assert held["with double quantization"] - disk["with double quantization"] == pytest.approx(0.5 + (16 + 256) * books)
    assert "in memory during training it costs" in fragment
    # on N(0, 1) weights, the format built from N(0, 1) quantiles has the lowest error
    control = {m: data["relative_rmse"][f"N(0,1) control / {m}"] for m in ("NF4", "FP4", "int4 (absmax, 15 levels)")}
    assert control["NF4"] < min(control["FP4"], control["int4 (absmax, 15 levels)"])


def test_report_fills_the_markers_from_the_stored_runs_and_leaves_the_prose(tiny, out, tmp_path, capsys):
    shutil.copytree(out / "runs", tmp_path / "lab" / "runs")
    alpha_runs = sorted((tmp_path / "lab" / "runs").glob("alpha*"))
    alpha_runs[0].unlink()   # one alpha row not finished yet
    page = tmp_path / "LAB.md"
    page.write_text("".join(f"Prose about {n}.\n<!-- lab:{n} -->\nold\n<!-- /lab:{n} -->\n"
                            for n in [*lab.EXPERIMENTS, "total", "claims"]))
    capsys.readouterr()
    assert lab.main(["report", "--tiny", "--model", tiny, "--out", str(tmp_path / "lab"), "--page", str(page),
                     "--seeds", "1"]) == 0
    assert "run(s) to do" not in capsys.readouterr().out   # report runs nothing
    assert len(list((tmp_path / "lab" / "runs").iterdir())) == len(list((out / "runs").iterdir())) - 1
    text = page.read_text()
    assert "Prose about qlora." in text and "old" not in text
    assert "| NF4, no double quantization |" in text
    assert "| 0 of 1 |" in text and "**Not finished**: alpha=" in text
    assert "*Not run yet: `python examples/lab.py seed`.*" in text
    runs = [json.loads(p.read_text()) for p in (tmp_path / "lab" / "runs").iterdir()]
    assert f"training runs: {len(runs)} of {len(runs) + 1} stored (the rest not run yet; the same command runs them, resuming from the stored ones)" in text
    assert f"{sum(r['cpu_s'] for r in runs):,.0f} CPU seconds" in text
    # the whole lab on this machine alone: the stored runs measured, the missing one from its recipe's step cost
    assert f"{len(runs)} runs measured here, 1 estimated from their recipe's CPU seconds a step" in text
    # no table wider than 8 columns; the claims table first, one row a claim, written from the tables' numbers
    assert max(len(line.strip("|").split("|")) for line in text.splitlines() if line.startswith("| ")) <= 8
    claims = table_rows(text.split("<!-- lab:claims -->")[1].split("<!-- /lab:claims -->")[0])
    assert [row[0] for row in claims] == [claim for _, claim in labclaims.CLAIMS]
    nf4_hits = table_rows(text.split("<!-- lab:qlora -->")[1])[0][1]
    assert f"Mean hits: NF4 {nf4_hits} (validation loss" in claims[7][1]
    assert "doubling r from 8 to 16" in claims[0][1] and "Not run yet: `python examples/lab.py seed`" in claims[6][1]


def test_the_sweeps_runs_are_scored_and_the_epochs_runs_are_not(tiny, out):
    """lab.py: the runs of rank, alpha, targets and qlora are scored on the held-out diamonds, the epochs
    runs are not; epochs validates EVALS_PER_EPOCH times an epoch, as its fragment says."""
    lab_ = lab_of(tiny, out)
    for name in ("rank", "alpha", "targets", "qlora"):
        assert all(s.score for s in lab.SPECS[name](lab_)) and all(
            "greedy" in labruns.load_result(s, str(out)) for s in lab.SPECS[name](lab_))
    epochs = lab.SPECS["epochs"](lab_)
    assert not any(s.score for s in epochs) and not any("greedy" in labruns.load_result(s, str(out)) for s in epochs)
    assert f"taken {labepochs.EVALS_PER_EPOCH} times an epoch; the runs are not scored" in (out / "epochs.md").read_text()


def test_a_runs_file_is_named_by_its_recipe_and_keyed_without_its_name(tiny, tmp_path):
    lab_ = lab_of(tiny, tmp_path)
    spec = lab_.spec("any name", lab_.settings(r=16, alpha=32), seed=1)
    renamed = dataclasses.replace(spec, name="another name")
    assert spec.key == renamed.key and spec.path(str(tmp_path)) == renamed.path(str(tmp_path))
    assert os.path.basename(spec.path(str(tmp_path))) == f"{labruns.label(spec.settings)}-s1-{spec.key}.json"
    assert labruns.label(spec.settings).startswith("r16_alpha32_")   # what differs from the lab's base, in order
    assert labruns.label(dict(PRESETS["lab"])) == "base"


def test_a_gpu_run_is_another_run_and_a_row_never_mixes_devices(tiny, tmp_path):
    lab_ = lab_of(tiny, tmp_path, seeds=2)
    cpu = lab_.specs("row", lab_.settings())
    gpu = [dataclasses.replace(s, device="cuda") for s in cpu]
    # the CPU's keys are those of the runs stored before `device` existed; a GPU's run is another file
    def key_before_device(spec):   # the key's formula before `device` existed
        what = {k: v for k, v in dataclasses.asdict(spec).items() if k not in ("name", "device")}
        return hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:10]

    assert all(c.key == key_before_device(c) for c in cpu)
    assert gpu[0].key != cpu[0].key and "-cuda-s0-" in gpu[0].path(str(tmp_path))

    def store(spec, hits):
        labruns.write_json(spec.path(str(tmp_path)), {"key": spec.key, "spec": dataclasses.asdict(spec), "hits": hits,
                                                      "device": "cpu" if spec.device == "cpu" else "NVIDIA H200"})

    report = lab.Lab(tiny, lab.TINY, str(tmp_path), seeds=(0, 1), stored_only=True)
    store(cpu[0], 1.0), store(gpu[0], 2.0), store(gpu[1], 3.0)
    assert [r["hits"] for r in report.run(cpu)] == [2.0, 3.0]   # the device with more of the row's seeds
    store(cpu[1], 4.0)
    assert [r["hits"] for r in report.run(cpu)] == [1.0, 4.0]   # a tie: the lab's own device
    assert [labsweeps.where(r) for r in report.run(gpu)] == ["CPU", "CPU"]
