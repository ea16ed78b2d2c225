"""sft.py: a supervised resume is exact (with length-bucketed batches too), Ctrl-C saves after the step and the resume is exact, and
tgo appends finished rollouts so a rerun continues from them."""
import dataclasses
import os

import pytest
import torch

import arc_eval
import cli
import data
import ddp
import loop
import models
import sft
from rollout import RolloutConfig



@pytest.mark.numerics
@pytest.mark.parametrize("length_buckets", [1, 3])      # 3: the stop falls inside a bucketed window
def test_supervised_resume_is_exact(tokenizer, model_dirs, fixed_rollouts, saved_weights, straight_and_resumed,
                                    length_buckets):
    records = data.load_trajectories(fixed_rollouts)
    cfg = sft.SupervisedConfig(steps=4, batch_size=4, micro_batch_size=2, lr=1e-2, warmup_steps=2, seed=1,
                               length_buckets=length_buckets)
    dist = ddp.Dist()

    def train(out, **kw):                      # a resume loads the model from its own checkpoint
        model = models.load_model(kw.get("resume") or model_dirs["student"], dist, trainable=True)
        sft.train_supervised(model, tokenizer, records, cfg, dist, loop.Run(out, **kw))
    straight, split, state = straight_and_resumed(train, stop_after=2)
    assert state["step"] == 2
    a, b = saved_weights(straight), saved_weights(split)
    for k in a:
        assert torch.equal(a[k], b[k]), f"resumed run differs on {k}"


def test_ctrl_c_in_a_supervised_stage_saves_after_the_step_and_the_resume_is_exact(tokenizer, model_dirs,
                                                                                   fixed_rollouts, tmp_path,
                                                                                   monkeypatch, saved_weights):
    import signal
    records = data.load_trajectories(fixed_rollouts)
    cfg = sft.SupervisedConfig(steps=4, batch_size=4, micro_batch_size=2, lr=1e-2, warmup_steps=2, seed=1)
    dist = ddp.Dist()
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    sft.train_supervised(models.load_model(model_dirs["student"], dist, trainable=True), tokenizer, records, cfg,
                         dist, loop.Run(straight))
    real_loss, calls = sft.supervised_loss, []

    def loss_then_ctrl_c(*args, **kwargs):               # Ctrl-C arrives in the middle of step 2's forward
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real_loss(*args, **kwargs)
    monkeypatch.setattr(sft, "supervised_loss", loss_then_ctrl_c)
    info = {"argv": ["train.py", "kd", "--data", "t.jsonl", "--out", split, "--overwrite"]}
    before = signal.getsignal(signal.SIGINT)    # SIG_IGN when the suite runs in a background job (nohup … &)
    with pytest.raises(cli.Interrupted, match=r"SIGINT: sft stopped after step 2 of 4 .* continue with: .*"
                       r"train.py kd --data t.jsonl --out .*split --resume .*split$") as stop:
        sft.train_supervised(models.load_model(model_dirs["student"], dist, trainable=True), tokenizer, records,
                             cfg, dist, loop.Run(split, info=info))
    assert stop.value.signum == signal.SIGINT and signal.getsignal(signal.SIGINT) is before   # handler restored
    assert torch.load(os.path.join(split, "trainer_state.pt"), weights_only=False)["step"] == 2
    monkeypatch.setattr(sft, "supervised_loss", real_loss)
    sft.train_supervised(models.load_model(split, dist, trainable=True), tokenizer, records, cfg, dist,
                         loop.Run(split, resume=split))
    a, b = saved_weights(straight), saved_weights(split)
    assert all(torch.equal(a[k], b[k]) for k in a), "the interrupted and resumed run differs"


def test_tgo_appends_finished_rollouts_and_a_rerun_continues_from_them(world, retriever, model_dirs, tmp_path,
                                                                       tokenizer, monkeypatch):
    teacher = models.load_model(model_dirs["teacher"], ddp.Dist(), trainable=False)
    rcfg = RolloutConfig(max_turns=1, max_new_tokens=4, greedy=True)
    questions, out = world.train[:5], str(tmp_path / "tgo.jsonl")
    real, asked = arc_eval.generate_records, []

    def crash_on_the_second_chunk(model, tok, chunk, *args, **kwargs):
        asked.append([q["id"] for q in chunk])
        if len(asked) == 2:
            raise RuntimeError("the machine went away")
        return real(model, tok, chunk, *args, **kwargs)
    monkeypatch.setattr(arc_eval, "generate_records", crash_on_the_second_chunk)
    with pytest.raises(RuntimeError, match="went away"):
        sft.run_tgo(teacher, tokenizer, questions, retriever, rcfg, ddp.Dist(), out, batch_size=2, keep_wrong=True)
    assert not os.path.exists(out) and len(data.read_appended(out + ".progress-rank0.jsonl")) == 1 + 2
    with pytest.raises(ValueError, match=r"progress-rank0.jsonl: unfinished tgo rollouts made with other settings "
                                         r"or inputs \(they differ in config\)"):
        sft.run_tgo(teacher, tokenizer, questions, retriever, dataclasses.replace(rcfg, max_new_tokens=5),
                    ddp.Dist(), out, batch_size=2, keep_wrong=True)
    asked.clear()
    monkeypatch.setattr(arc_eval, "generate_records", lambda m, t, chunk, *a, **k: asked.append(
        [q["id"] for q in chunk]) or real(m, t, chunk, *a, **k))
    stats = sft.run_tgo(teacher, tokenizer, questions, retriever, rcfg, ddp.Dist(), out, batch_size=2,
                        keep_wrong=True)
    assert asked == [[q["id"] for q in questions[2:4]], [questions[4]["id"]]]      # the first two: not again
    assert [r["id"] for r in data.load_trajectories(out)] == [q["id"] for q in questions] and stats["rollouts"] == 5
    assert sft.tgo_progress_files(out) == []
    # the same trajectories as a run never interrupted (greedy)
    monkeypatch.setattr(arc_eval, "generate_records", real)
    sft.run_tgo(teacher, tokenizer, questions, retriever, rcfg, ddp.Dist(), str(tmp_path / "one.jsonl"),
                batch_size=2, keep_wrong=True)
    assert [r["input_ids"] for r in data.load_trajectories(out)] == \
        [r["input_ids"] for r in data.load_trajectories(str(tmp_path / "one.jsonl"))]
