"""examples/one_step.py: the four steps of one training step, and what it says it shows."""
import importlib.util
import os

import pytest
import torch

from conftest import ROOT


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_one_step_prints_the_four_steps_and_its_claims_hold(capsys):
    shown = load_example("one_step").main(["--lr", "0.01", "--weight-decay", "0.1"])
    out = capsys.readouterr().out
    for line in ("1. forward:", "2. loss:", "3. backward:", "4. AdamW:"):
        assert line in out
    assert "hidden states (2, 10, 32)" in out and "dL/dA (4, 32)" in out and "dL/dB (32, 4)" in out
    assert shown["shapes"] == dict(hidden=(2, 10, 32), logits=(2, 10, 64), A=(4, 32), B=(32, 4))
    assert shown["logits_diff"] == 0.0                     # B = 0: the base model's logits exactly
    assert shown["grad_A_max"] == 0.0 and shown["grad_B_max"] > 1e-4   # while B = 0, A learns nothing
    assert shown["A_only_decayed"]
    assert shown["adamw_diff"] <= 1e-7 and shown["B_moved"] == pytest.approx(0.01, rel=0.01)  # t = 1: a step of lr
    assert abs(shown["loss"] - torch.log(torch.tensor(64.0)).item()) < 0.5   # a random model guesses near uniform


def test_one_step_help_runs_in_process(capsys):
    with pytest.raises(SystemExit) as done:
        load_example("one_step").main(["--help"])
    assert done.value.code == 0 and "--weight-decay" in capsys.readouterr().out
