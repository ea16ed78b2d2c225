"""loop.py: a non-finite loss skips the step and counts it; a zero-gradient step moves nothing while
the schedule advances; the data order is a permutation per epoch that depends only on seed and
position; --report-to wandb without the package names it; a stage saves at its cadence and its end,
logs every step, and stops where --stop-after says. (Resuming through the stage skeleton is proved
bit for bit by the trainers' resume tests: test_sft.py, test_rl.py, test_checkpoint.py.)"""
import json
import os
import signal

import numpy as np
import pytest
import torch

import cli
import data
import ddp
import loop
import models
import rl
import sft


def test_nonfinite_loss_skips_the_step_counts_it_and_warns(tokenizer, model_dirs, fixed_rollouts, rl_config):
    dist = ddp.Dist()
    model = models.load_model(model_dirs["student"], dist, trainable=True)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))       # every logit becomes NaN
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = rl_config(teacher_mode="none")
    optimizer, scheduler = loop.make_optimizer(model, cfg.lr, 0.0, 1, 0, None)
    records = data.load_trajectories(fixed_rollouts)
    counters = {}
    with pytest.warns(UserWarning, match="step skipped"):
        rl.rl_update(model, None, optimizer, scheduler, records, cfg, dist, len(tokenizer), counters)
    assert counters["skipped_steps"] == 1
    after = model.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]) or torch.isnan(before[k]).all(), k


def _state_tensors(state):
    """Every tensor of a (nested) optimizer state dict, by path, cloned."""
    out = {}
    for pid, slots in state["state"].items():
        for name, value in slots.items():
            out[f"{pid}.{name}"] = value.clone() if torch.is_tensor(value) else value
    return out


def test_a_zero_gradient_step_moves_nothing_counts_it_and_the_schedule_still_advances(tokenizer, model_dirs,
                                                                                      fixed_rollouts, rl_config):
    """After a real step AdamW holds momentum; a step whose gradient is exactly zero (every group
    constant, no teacher term) must then leave every weight and the optimizer's state (moments and
    step count) as they are — AdamW would otherwise move the weights by ~0.64 × lr — count itself,
    and still advance the learning-rate schedule."""
    dist = ddp.Dist()
    model = models.load_model(model_dirs["student"], dist, trainable=True)
    cfg = rl_config(teacher_mode="none", lr=1e-2)
    optimizer, scheduler = loop.make_optimizer(model, cfg.lr, 0.1, 10, 4, None)   # warm-up: lr changes per step
    records = data.load_trajectories(fixed_rollouts)       # mixed groups: a real gradient
    counters = {}
    view = models.wrap(model, dist)
    rl.rl_update(view, None, optimizer, scheduler, records, cfg, dist, len(tokenizer), counters)
    assert "zero_grad_steps" not in counters and optimizer.state_dict()["state"], "the first step is a real one"
    params = {k: v.clone() for k, v in model.state_dict().items()}
    state, lr = _state_tensors(optimizer.state_dict()), scheduler.get_last_lr()[0]
    constant = [{**r, "em": 1.0} for r in records]           # every group all right: advantage exactly 0
    row = rl.rl_update(view, None, optimizer, scheduler, constant, cfg, dist, len(tokenizer), counters)
    assert row["grad_norm"] == 0.0 and counters["zero_grad_steps"] == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k
    after = _state_tensors(optimizer.state_dict())
    assert after.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(after[k], v) if torch.is_tensor(v) else after[k] == v, k
    assert (lr, scheduler.get_last_lr()[0]) == pytest.approx((0.5e-2, 0.75e-2))   # the warm-up moved on: 2/4 -> 3/4
    # the same empty step without the skip: AdamW replays its momentum and the weights move
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    assert any(not torch.equal(v, params[k]) for k, v in model.state_dict().items())


def test_data_window_is_a_permutation_per_epoch_and_depends_only_on_seed_and_position():
    n = 7
    stream = loop.data_window(5, n, 0, 3 * n)
    for epoch in range(3):
        assert sorted(stream[epoch * n:(epoch + 1) * n]) == list(range(n))
    assert stream[4:10] == loop.data_window(5, n, 4, 6)
    assert stream != loop.data_window(6, n, 0, 3 * n)


def test_length_buckets_hold_the_same_sequences_as_the_unbucketed_window_each_batch_a_run_of_neighbouring_lengths():
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(5, 500, size=103)]
    batch, buckets = 4, 6
    assert all(loop.length_bucketed_window(3, lengths, s, batch, 1) == loop.data_window(3, 103, s * batch, batch)
               for s in range(40))
    for window in range(5):                              # windows straddle epochs (103 is not a multiple of 24)
        steps = range(window * buckets, (window + 1) * buckets)
        got = [loop.length_bucketed_window(3, lengths, s, batch, buckets) for s in steps]
        plain = loop.data_window(3, 103, window * buckets * batch, buckets * batch)
        assert sorted(i for b in got for i in b) == sorted(plain)          # the same items, each once
        # the batches tile the window's sorted lengths: no batch's lengths interleave another's
        spans = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in got)
        assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:]))
        padded_positions = sum(max(lengths[i] for i in b) * len(b) for b in got)
        plain_padded = sum(max(lengths[i] for i in plain[k:k + batch]) * batch for k in range(0, len(plain), batch))
        assert padded_positions < plain_padded
        # a pure function of (seed, step): the same call again, and another seed orders the batches otherwise
        assert got == [loop.length_bucketed_window(3, lengths, s, batch, buckets) for s in steps]
    assert [loop.length_bucketed_window(4, lengths, s, batch, buckets) for s in range(12)] != \
        [loop.length_bucketed_window(3, lengths, s, batch, buckets) for s in range(12)]


def test_report_to_wandb_without_the_package_names_it(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(ImportError, match="--report-to wandb needs the optional package 'wandb'"):
        loop.Reporter(str(tmp_path), "wandb", "rl", {}, ddp.Dist())


def _run_stage(run: loop.Run, steps: int, save_every: int, signal_at: int | None = None) -> list[int]:
    """A stage with no model: every step only logs its row; returns the steps `save` was asked for."""
    cfg = sft.SupervisedConfig(steps=steps, save_every=save_every)
    stage = loop.open_stage("sft", cfg, run, None, None, None, ddp.Dist())
    saved = []
    with stage as bar:
        for step in bar:
            if step == signal_at:
                stage.stop.signum = signal.SIGTERM          # as the handler would on a SIGTERM
            stage.after_step(step, {"step": step + 1}, saved.append)
    stage.finish(saved.append)
    return saved


def test_a_stage_saves_every_save_every_steps_and_once_at_its_end_and_logs_every_step(tmp_path):
    out = str(tmp_path / "run")
    assert _run_stage(loop.Run(out), steps=5, save_every=2) == [2, 4, 5]
    assert [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))] == [1, 2, 3, 4, 5]
    assert _run_stage(loop.Run(str(tmp_path / "short"), stop_after=3), steps=5, save_every=2) == [2, 3]
    assert _run_stage(loop.Run(str(tmp_path / "end"), stop_after=9), steps=4, save_every=0) == [4]


def test_a_signal_saves_after_the_step_and_names_the_command_that_continues(tmp_path):
    out = str(tmp_path / "run")
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(cli.Interrupted, match=r"SIGTERM: sft stopped after step 2 of 5 .*--resume " + out):
        _run_stage(loop.Run(out, info={"argv": ["train.py", "kd", "--out", out]}), steps=5, save_every=0,
                   signal_at=1)
    assert signal.getsignal(signal.SIGTERM) is before                 # the handler is given back


def test_a_signal_in_the_last_step_of_a_run_cut_short_saves_and_still_stops(tmp_path):
    """With stop_after the last step of the run is not the stage's: a signal there must not be dropped
    (the caller would run the next segment)."""
    out = str(tmp_path / "run")
    with pytest.raises(cli.Interrupted, match=r"SIGTERM: sft stopped after step 3 of 5 .*--resume " + out):
        _run_stage(loop.Run(out, stop_after=3, info={"argv": ["train.py", "kd", "--out", out]}), steps=5,
                   save_every=0, signal_at=2)
    finished = str(tmp_path / "whole")                                # a whole run has no next segment
    assert _run_stage(loop.Run(finished), steps=3, save_every=0, signal_at=2) == [3]


def test_override_config_without_resume_is_refused_when_the_run_is_described():
    with pytest.raises(ValueError, match="--override-config only makes sense with --resume"):
        loop.Run("out", override_config=True)
