"""examples/lab.py: every experiment end to end on a tiny random Llama (`--tiny`): files, rows, numbers."""
import json
import os
import sys

import pytest

from conftest import ROOT
from test_pricer import write_tiny_checkpoint

EXAMPLES = os.path.join(ROOT, "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)

import lab  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("tiny_lab")))


def run_lab(name, tiny, out):
    assert lab.main([name, "--tiny", "--model", tiny, "--out", str(out)]) == 0
    assert (out / f"{name}.png").stat().st_size > 1000
    fragment = (out / f"{name}.md").read_text()
    assert f"Command: `python examples/lab.py {name} --model {tiny}" in fragment and f"![{name}]" in fragment
    data = json.loads((out / f"{name}.json").read_text())
    return fragment, data


def table_rows(fragment):
    lines = [line for line in fragment.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]  # header and rule dropped


def test_rank_has_a_row_per_r_and_parameters_grow_with_r(tiny, tmp_path):
    fragment, data = run_lab("rank", tiny, tmp_path)
    assert [row[0] for row in table_rows(fragment)] == [str(r) for r in lab.RANKS]
    counts = [run["trainable"] for run in data["runs"]]
    # A is r x in and B is out x r: the count is r times a constant, and fp32 adapters take 4 bytes each
    assert len({n // r for n, r in zip(counts, lab.RANKS)}) == 1 and all(n % r == 0 for n, r in zip(counts, lab.RANKS))
    assert [run["adapter_bytes"] for run in data["runs"]] == [4 * n for n in counts]
    assert [run["settings"]["alpha"] for run in data["runs"]] == [2 * r for r in lab.RANKS]


def test_alpha_changes_the_update_and_not_the_parameters(tiny, tmp_path):
    fragment, data = run_lab("alpha", tiny, tmp_path)
    assert [row[0] for row in table_rows(fragment)] == [str(a) for a in lab.ALPHAS]
    assert len({run["trainable"] for run in data["runs"]}) == 1
    # B starts at zero and the warmup's first learning rate is 0, so steps 1 and 2 see the base model
    # for every alpha; step 3 follows the first real update, whose effect is scaled by alpha / r
    first = {run["train_losses"][1][1] for run in data["runs"]}
    third = {run["train_losses"][2][1] for run in data["runs"]}
    assert len(first) == 1 and len(third) == len(lab.ALPHAS)


def test_targets_attention_plus_mlp_is_all_seven_and_all_layers_is_more(tiny, tmp_path):
    fragment, data = run_lab("targets", tiny, tmp_path)
    assert [row[0] for row in table_rows(fragment)] == [name for name, _, _ in lab.TARGETS]
    attention, mlp, seven, everywhere = (run["trainable"] for run in data["runs"])
    assert attention + mlp == seven and everywhere == 2 * seven  # the tiny model: 2 layers, the upper half is 1


def test_epochs_draws_three_epochs_with_validation_and_the_schedule(tiny, tmp_path):
    fragment, data = run_lab("epochs", tiny, tmp_path)
    assert [row[0] for row in table_rows(fragment)] == ["1", "2", "3"]
    steps = 3 * data["steps_per_epoch"]
    assert [s for s, _ in data["train_losses"]] == list(range(1, steps + 1))
    assert [s for s, _ in data["val_losses"]] == list(range(1, steps + 1))  # --tiny validates every step
    lr = data["lr"]
    assert lr[0] == 0.0 and max(lr) == pytest.approx(lab.Lab(None, lab.TINY, "").settings()["lr"])  # warmup, peak
    assert all(a >= b for a, b in zip(lr[1:], lr[2:]))  # then the cosine only falls
    assert "Epoch 2 start" in fragment and "Lowest validation loss" in fragment


def test_seed_twice_is_identical_and_another_seed_is_not(tiny, tmp_path):
    fragment, data = run_lab("seed", tiny, tmp_path)
    first, again, other = data["curves"]
    assert first == again and first != other
    assert "Maximum difference between the two seed-42 curves: 0.0." in fragment


def test_nf4_compares_three_formats_and_measures_bits(tiny, tmp_path):
    fragment, data = run_lab("nf4", tiny, tmp_path)
    header = [line for line in fragment.splitlines() if line.startswith("| weights")][0]
    assert "NF4" in header and "FP4" in header and "int4" in header
    assert [row[0] for row in table_rows(fragment)][-2:] == ["all real matrices", "N(0,1) control"]
    # closed form: 4 bits + one fp32 absmax per 64 weights = 4.5; double quantization stores it in 8 bits
    # per block plus an fp32 scale per 256 blocks and one fp32 offset
    bits = data["bits_per_parameter"]
    assert bits["without double quantization"] == pytest.approx(4.5)
    assert 4 + 8 / 64 < bits["with double quantization"] < 4.5
    # on N(0, 1) weights, the format built from N(0, 1) quantiles has the lowest error
    control = {m: data["relative_rmse"][f"N(0,1) control / {m}"] for m in ("NF4", "FP4", "int4 (absmax)")}
    assert control["NF4"] < min(control["FP4"], control["int4 (absmax)"])


def test_report_fills_the_markers_and_leaves_the_prose(tiny, tmp_path):
    run_lab("seed", tiny, tmp_path)
    page = tmp_path / "LAB.md"
    page.write_text("".join(f"Prose about {n}.\n<!-- lab:{n} -->\nold\n<!-- /lab:{n} -->\n" for n in lab.EXPERIMENTS))
    assert lab.main(["report", "--out", str(tmp_path), "--page", str(page)]) == 0
    text = page.read_text()
    assert "Prose about seed." in text and "old" not in text
    assert "Maximum difference between the two seed-42 curves: 0.0." in text
    assert "*Not run yet: `python examples/lab.py rank`.*" in text
