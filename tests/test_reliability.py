"""Runs that survive what users' machines do: preemption signals, broken checkpoints, full disks.

References: an uninterrupted run of the same configuration (adapters compared bit for bit).
"""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from train_script import CharTokenizer, pricer_items, signal_at_forward, tiny_lora_model  # noqa: E402

import train.checkpoint as checkpoint  # noqa: E402
from lora import lora_state_dict, read_adapter  # noqa: E402
from train import (  # noqa: E402
    CheckpointSpaceError, TrainConfig, TrainingInterrupted, latest_checkpoint, list_checkpoints, load_checkpoint,
    prune_checkpoints, save_checkpoint, train, verify_checkpoint,
)

SCRIPT = os.path.join(HERE, "preempt_script.py")
PY = sys.executable
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def same_adapter(a_dir, b_dir):
    a, b = read_adapter(str(a_dir))[1], read_adapter(str(b_dir))[1]
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------- SIGTERM
def _launch(out, mode, *extra, ddp=False):
    os.makedirs(out, exist_ok=True)
    head = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if ddp else [PY]
    return head + [SCRIPT, str(out), mode] + (["--ddp"] if ddp else []) + list(extra)


def _preempt(out, after: int, ddp=False, second_signal=False):
    """Start a run, SIGTERM it (rank 1 alone under torchrun) once it printed `done <after>`."""
    extra = ["--sleep", "0.2"] + (["--second-signal"] if second_signal else [])
    p = subprocess.Popen(_launch(out, "run", *extra, ddp=ddp), env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if f"rank {1 if ddp else 0} done {after}" in line:
            os.kill(int(open(os.path.join(out, f"pid-{1 if ddp else 0}")).read()), signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    return p.returncode, lines, err


def _reference(out, ddp=False):
    """The uninterrupted run, started in the background while the test preempts another."""
    return subprocess.Popen(_launch(out, "full", ddp=ddp), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def _finished(p):
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]


def test_sigterm_mid_run_saves_a_checkpoint_that_resumes_bit_identical_despite_a_second_sigterm(tmp_path):
    full = _reference(tmp_path / "full")
    out = tmp_path / "cut"
    # a second SIGTERM arrives while the checkpoint is half written: noted, ignored, the save completes
    code, lines, err = _preempt(out, after=2, second_signal=True)
    assert code == 143, err
    assert "SIGTERM again: still saving" in err
    saved = [name for name in os.listdir(out) if name.startswith("checkpoint-")]
    assert len(saved) == 1 and not saved[0].endswith(".tmp")  # save_every is off: the signal wrote it
    step = int(saved[0].split("-")[1])
    assert 2 <= step < 6 and sum("done" in line for line in lines) == step  # the step in flight finished
    assert verify_checkpoint(str(out / saved[0])) is None
    message = [line for line in err.splitlines() if line.startswith("stopped by SIGTERM")]
    assert message == [f"stopped by SIGTERM after step {step} of 6: checkpoint {out / saved[0]}; "
                       f"resume with: {PY} {SCRIPT} {out} resume"]
    resumed = subprocess.run(_launch(out, "resume"), env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    _finished(full)
    assert same_adapter(tmp_path / "full" / "final", out / "final")
    assert json.load(open(tmp_path / "full" / "result.json")) == json.load(open(out / "result.json"))


def test_sigterm_to_one_of_two_gloo_ranks_stops_both_after_the_same_step_and_resumes_bit_identical(tmp_path):
    full = _reference(tmp_path / "full", ddp=True)
    out = tmp_path / "cut"
    _, lines, err = _preempt(out, after=2, ddp=True)
    saved = [name for name in os.listdir(out) if name.startswith("checkpoint-")]
    assert len(saved) == 1, err[-3000:]
    step = int(saved[0].split("-")[1])
    # only rank 1 got the signal; rank 0 learnt it through the all-reduce and stopped after the same step
    assert [sum(f"rank {r} done" in line for line in lines) for r in (0, 1)] == [step, step]
    # (torchrun may SIGTERM rank 0 once rank 1 has exited: after the save, perhaps before rank 0's message)
    messages = [line for line in err.splitlines() if "stopped by SIGTERM" in line]
    assert messages and all(f"stopped by SIGTERM after step {step} of 6" in line for line in messages)
    resumed = subprocess.run(_launch(out, "resume", ddp=True), env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _finished(full)
    assert same_adapter(tmp_path / "full" / "final", out / "final")
    assert json.load(open(tmp_path / "full" / "result.json")) == json.load(open(out / "result.json"))


def test_sigint_in_process_raises_training_interrupted_with_status_130_and_restores_the_handler(tmp_path):
    model = tiny_lora_model()
    calls = signal_at_forward(model, 3, signal.SIGINT)  # Ctrl-C during step 3
    before = signal.getsignal(signal.SIGINT)
    cfg = TrainConfig(max_steps=6, batch_size=4, out_dir=str(tmp_path), progress=False, run_name="r")
    with pytest.raises(TrainingInterrupted) as info:
        train(model, CharTokenizer(), pricer_items(24), None, cfg)
    e = info.value
    assert (e.signum, e.exit_code, e.step, e.checkpoint) == (signal.SIGINT, 130, 3, str(tmp_path / "checkpoint-3"))
    assert signal.getsignal(signal.SIGINT) is before
    assert load_checkpoint(e.checkpoint, tiny_lora_model())["step"] == 3
    # a signal in the last step: still a checkpoint and TrainingInterrupted; the resume has nothing left to train
    calls[0] = 0  # the resume trains steps 4, 5, 6: the 3rd forward pass is step 6's
    with pytest.raises(TrainingInterrupted) as info:
        train(model, CharTokenizer(), pricer_items(24), None, cfg, resume=True)
    assert (info.value.step, info.value.checkpoint) == (6, str(tmp_path / "checkpoint-6"))
    assert train(model, CharTokenizer(), pricer_items(24), None, cfg, resume=True).step == 6
    # without out_dir the run still stops cleanly after the step, with nothing to resume from
    calls[0] = 0
    with pytest.raises(TrainingInterrupted, match="no checkpoint") as info:
        train(model, CharTokenizer(), pricer_items(24), None, TrainConfig(max_steps=6, batch_size=4, progress=False))
    assert info.value.checkpoint is None and info.value.step == 3


# ---------------------------------------------------------------------------------------- broken checkpoints
def _config(out, **kw):
    base = dict(lr=5e-3, max_steps=6, batch_size=4, warmup_steps=1, save_every=2, out_dir=str(out), progress=False,
                run_name="r")
    base.update(kw)
    return TrainConfig(**base)


def _train(out, resume=False, **kw):
    model = tiny_lora_model(dropout=0.1)
    result = train(model, CharTokenizer(), pricer_items(24), None, _config(out, **kw), resume=resume)
    return model, result


SHORT = dict(max_steps=4, save_every=1, keep_last=2)  # checkpoints after every step, the newest two kept


def _cut_after_3(out):
    """checkpoint-2 and checkpoint-3 of a 4-step run, as a run preempted in step 3 leaves them."""
    model = tiny_lora_model(dropout=0.1)
    signal_at_forward(model, 3, signal.SIGTERM)
    with pytest.raises(TrainingInterrupted):
        train(model, CharTokenizer(), pricer_items(24), None, _config(out, **SHORT))


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _flip_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x01]))


def test_a_packed_run_preempted_mid_run_resumes_bit_identical(tmp_path):
    packed = dict(SHORT, packing=True, max_len=128)  # 9 rows of 1 to 3 examples, 3 steps an epoch: step 4 in epoch 2
    model = tiny_lora_model(dropout=0.1)
    signal_at_forward(model, 3, signal.SIGTERM)
    with pytest.raises(TrainingInterrupted):
        train(model, CharTokenizer(), pricer_items(24), None, _config(tmp_path / "cut", **packed))
    resumed, result = _train(tmp_path / "cut", resume=True, **packed)
    reference, full = _train(tmp_path / "full", **packed)
    assert [s for s, _ in result.train_losses] == [1, 2, 3, 4] and result.train_losses == full.train_losses
    ours, ref = lora_state_dict(resumed), lora_state_dict(reference)
    assert ref and all(torch.equal(ours[k], ref[k]) for k in ref)


@pytest.fixture(scope="module")
def cut_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cut") / "run"
    _cut_after_3(out)
    model, _ = _train(tmp_path_factory.mktemp("ref") / "full", **SHORT)
    return out, lora_state_dict(model)


@pytest.mark.parametrize("damage", [_truncate, _flip_byte], ids=["truncated", "one-byte"])
@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json", "training_state.pt",
                                  "manifest.json"])
def test_each_file_of_the_newest_checkpoint_broken_in_turn_falls_back_and_resumes_bit_identical(
        cut_run, tmp_path, name, damage):
    source, reference = cut_run
    out = tmp_path / "run"
    shutil.copytree(source, out)
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-3"]
    damage(out / "checkpoint-3" / name)
    assert verify_checkpoint(str(out / "checkpoint-3")) is not None
    with pytest.warns(UserWarning, match=f"{out / 'checkpoint-3'} fails its manifest .*falling back to "
                                         f"{out / 'checkpoint-2'}"):
        model, result = _train(out, resume=True, **SHORT)
    assert result.step == 4 and [s for s, _ in result.train_losses] == [1, 2, 3, 4]
    ours = lora_state_dict(model)
    assert all(torch.equal(ours[k], reference[k]) for k in reference)
    assert [s for s, _ in list_checkpoints(str(out))] == [3, 4]  # the broken one was replaced on the way


def test_latest_checkpoint_never_returns_a_broken_one_and_load_checkpoint_refuses_it(cut_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(cut_run[0], out)
    _truncate(out / "checkpoint-2" / "training_state.pt")
    _flip_byte(out / "checkpoint-3" / "adapter_model.safetensors")
    with pytest.warns(UserWarning, match="no checkpoint .* passes its manifest"):
        assert latest_checkpoint(str(out)) is None
    model = tiny_lora_model()
    before = lora_state_dict(model)
    before = {k: v.clone() for k, v in before.items()}
    with pytest.raises(ValueError, match="checkpoint-3 is not a complete checkpoint: adapter_model.safetensors fails"):
        load_checkpoint(str(out / "checkpoint-3"), model)
    assert all(torch.equal(before[k], v) for k, v in lora_state_dict(model).items())  # untouched
    os.remove(out / "checkpoint-2" / "manifest.json")  # a folder without manifest is not a checkpoint at all
    assert [s for s, _ in list_checkpoints(str(out))] == [3]
    with pytest.raises(ValueError, match="no complete checkpoint"), pytest.warns(UserWarning):
        _train(out, resume=True, **SHORT)


def test_pruning_keeps_the_newest_good_checkpoints_and_never_the_only_good_one(tmp_path):
    model = tiny_lora_model()
    for step in (2, 4, 6):
        save_checkpoint(str(tmp_path), step, model, {"step": step})
    _truncate(tmp_path / "checkpoint-4" / "training_state.pt")
    _truncate(tmp_path / "checkpoint-6" / "adapter_model.safetensors")
    assert prune_checkpoints(str(tmp_path), keep_last=1) == []  # checkpoint-2 is the only good one: kept
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [2, 4, 6]
    save_checkpoint(str(tmp_path), 8, model, {"step": 8}, keep_last=1)
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [8]  # a newer good one: the rest may go


# ---------------------------------------------------------------------------------------- full disk
def test_a_disk_that_fills_during_a_save_leaves_the_previous_checkpoint_and_names_folder_and_bytes(
        tmp_path, monkeypatch):
    write = checkpoint._write_bytes

    def full_disk_on_step_4(path, data):
        if "checkpoint-4" in path:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        write(path, data)

    monkeypatch.setattr(checkpoint, "_write_bytes", full_disk_on_step_4)
    with pytest.raises(CheckpointSpaceError, match=rf"no space left in {tmp_path} for checkpoint-4: it needs about "
                                                   rf"[\d,]+ bytes; {tmp_path / 'checkpoint-2'} is intact"):
        _train(tmp_path)
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("checkpoint")) == ["checkpoint-2"]
    assert verify_checkpoint(str(tmp_path / "checkpoint-2")) is None
    monkeypatch.setattr(checkpoint, "_write_bytes", write)  # space freed: the run resumes from step 2
    model, result = _train(tmp_path, resume=True)
    assert result.step == 6


def test_too_little_free_space_stops_before_writing_with_an_estimate_that_covers_the_checkpoint(tmp_path, monkeypatch):
    model = tiny_lora_model()
    state = {"step": 2, "optimizer": {"m": torch.zeros(1000)}}
    written = save_checkpoint(str(tmp_path), 2, model, state)
    size = sum(os.path.getsize(os.path.join(written, n)) for n in os.listdir(written))
    usage = shutil.disk_usage(str(tmp_path))
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage._replace(free=size // 2))
    with pytest.raises(CheckpointSpaceError) as info:
        save_checkpoint(str(tmp_path), 4, model, state)
    needed = int(str(info.value).split("needs about ")[1].split(" bytes")[0].replace(",", ""))
    assert size <= needed <= size + (1 << 17) and f"{size // 2:,} are free" in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2"]
