"""train.py: the stages chain (the demo, the command line), resume and --overwrite guard a run
directory, a kill inside a save or a SIGTERM loses nothing, bad input stops early with one clear
message. Each module's own properties are in its test file (test_models.py, test_loop.py,
test_sft.py, test_rl.py, test_checkpoint.py); the learning tests (KD lowers held-out loss, RL raises
EM) are in test_train_learning.py."""
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import arc_eval
import checkpoint
import cli
import data
import ddp
import demo
import loop
import models
import retriever as retriever_lib
import rollout
import rl
import settings
import sft
import stats
import train
from rollout import RolloutConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_small_preset_runs_every_stage_and_each_writes_what_the_next_reads(tmp_path, capsys):
    reports = train.run_demo("small", str(tmp_path), ddp.Dist())
    for name in ("teacher", "base", "kd", "dgpo", "dgpo/best"):
        assert os.path.isfile(tmp_path / name / "config.json"), name
    assert json.loads((tmp_path / "base" / "train_config.json").read_text())["stage"] == "pretrain"
    assert data.load_trajectories(str(tmp_path / "oracle.jsonl"))
    assert data.load_trajectories(str(tmp_path / "tgo.jsonl"))          # read by kd
    assert os.path.isfile(tmp_path / "dgpo" / "trainer_state.pt")
    assert set(reports) == {"Student (base)", "Teacher", "KD only", "DGPO"}
    for name in ("student", "teacher", "kd", "dgpo"):
        assert data.load_trajectories(str(tmp_path / "eval" / name / "trajectories.jsonl"))
    out = capsys.readouterr().out
    assert "EM on the demo test split" in out
    # every other model against the KD model, paired on the same test questions
    assert "Paired on the same test questions" in out and "| method − KD only | questions |" in out
    paired = json.loads((tmp_path / "results.json").read_text())["paired_vs_kd"]
    assert set(paired) == {"Student (base)", "Teacher", "DGPO"}
    kd = arc_eval.per_question_em(str(tmp_path / "eval" / "kd" / "trajectories.jsonl"))
    dgpo = arc_eval.per_question_em(str(tmp_path / "eval" / "dgpo" / "trajectories.jsonl"))
    assert paired["DGPO"]["n"] == len(kd) == 4
    assert paired["DGPO"]["diff"] == pytest.approx(sum(dgpo[k] - kd[k] for k in kd) / len(kd))
    assert f"| DGPO | 4 | {stats.format_difference(paired['DGPO'])} |" in out


def test_bad_input_stops_early_with_a_clear_message(world, retriever, model_dirs, tmp_path, rl_config):
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        models.load_model(str(tmp_path / "missing"), ddp.Dist(), trainable=False)
    with pytest.raises(ValueError, match="not divisible by world size"):
        rl.train_rl(model_dirs["student"], model_dirs["teacher"], world.train[:4], retriever,
                    rl_config(prompts_per_step=3), ddp.Dist(world_size=2), loop.Run(str(tmp_path / "x")))
    with pytest.raises(ValueError, match="exactly one of"):
        retriever_lib.make_retriever(None, None)
    with pytest.raises(ValueError, match="exactly one of"):
        retriever_lib.make_retriever("c.jsonl", None, index="idx")
    with pytest.raises(ConnectionError, match="--retriever-url: .*127.0.0.1:9"):   # an OSError: one line
        retriever_lib.make_retriever(None, "http://127.0.0.1:9/retrieve", retry_seconds=0)


def test_cli_parses_every_stage_and_defaults_to_the_demo(capsys):
    args = train.parse_args([])
    assert args.stage == "demo" and args.preset == "default"
    args = train.parse_args(["rl", "--student", "s", "--teacher", "t", "--data", "d", "--corpus", "c",
                             "--out", "o", "--beta", "0.2", "--teacher-mode", "uniform", "--kl", "k2"])
    cfg = cli.config_from_args(args, rl.RLConfig)
    assert (cfg.beta, cfg.teacher_mode, cfg.kl, cfg.group_size) == (0.2, "uniform", "k2", 5)
    args = train.parse_args(["tgo", "--teacher", "t", "--data", "d", "--corpus", "c", "--out", "o",
                             "--max-turns", "2", "--greedy", "--seed", "4"])
    rcfg = cli.config_from_args(args, RolloutConfig)
    assert (rcfg.max_turns, rcfg.greedy, rcfg.seed, rcfg.max_total_tokens) == (2, True, 4, None)
    for flag, bad in [("--kl", "k4"), ("--teacher-mode", "selctive"), ("--agg", "mean")]:
        with pytest.raises(SystemExit):
            train.parse_args(["rl", "--student", "s", "--data", "d", "--corpus", "c", "--out", "o", flag, bad])
        assert f"argument {flag}: invalid choice: '{bad}'" in capsys.readouterr().err


def test_eval_stage_is_arc_metric_entry_point(world, model_dirs, tmp_path, capsys):
    paths = demo.write_world(world, str(tmp_path / "data"))
    train.main(["eval", "--model", model_dirs["student"], "--data", paths["test"], "--corpus", paths["corpus"],
                "--out", str(tmp_path / "eval"), "--limit", "3", "--max-new-tokens", "4", "--max-turns", "1",
                "--no-progress"])
    report = json.load(open(tmp_path / "eval" / "report.json"))
    assert report["questions"] == 3 and "all" in report["report"]
    assert len(data.load_trajectories(str(tmp_path / "eval" / "trajectories.jsonl"))) == 3
    assert "| all |" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# RL scores tokens with the distribution that sampled them; validation starts at step 0


# -----------------------------------------------------------------------------
# Failure behaviour: crashes inside a save, changed resumes, reused outputs, bad values, bad models


def _kill_run(model_dirs, out, point, n, resume=None):
    script = os.path.join(ROOT, "tests", "kill_during_save.py")
    cmd = [sys.executable, script, model_dirs["student"], model_dirs["teacher"], out, point, str(n)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd + ([resume] if resume else []), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
@pytest.mark.numerics
def test_kills_inside_saves_always_leave_a_complete_checkpoint_and_resume_ends_bit_identical(
        world, retriever, model_dirs, tmp_path, saved_weights):
    """One run, killed by SIGKILL inside four different saves at four different points; each time
    --resume continues from the last complete checkpoint. The end equals an uninterrupted run, and
    every step is logged exactly once."""
    # The uninterrupted run is the same kind of process with the same thread count as the killed ones
    # (a subprocess at OMP_NUM_THREADS=1): floating-point sums depend on the thread count, so a run
    # inside pytest (torch's default threads) would differ in the last bits for reasons other than resume.
    straight = str(tmp_path / "straight")
    assert _kill_run(model_dirs, straight, "none", 0).returncode == 0
    out = str(tmp_path / "runs" / "killed")
    # (point, which save of that process, the step of the checkpoint resume must find afterwards)
    plan = [("state", 2, 1), ("carry", 1, 2), ("swap", 1, 3), ("weights", 1, 3)]
    for k, (point, n, step_after) in enumerate(plan):
        result = _kill_run(model_dirs, out, point, n, resume=out if k else None)
        assert result.returncode == -9, (point, result.stderr[-2000:])
        # what a resume will find, checked on a copy: the next resume must do the recovery itself
        look = tmp_path / f"look{k}"
        shutil.copytree(tmp_path / "runs", look, symlinks=True)
        checkpoint.recover(str(look / "killed"))
        assert torch.load(look / "killed" / "trainer_state.pt", weights_only=False)["step"] == step_after, point
        assert checkpoint.is_complete(str(look / "killed")) and os.listdir(look) == ["killed"]
    result = _kill_run(model_dirs, out, "none", 0, resume=out)
    assert result.returncode == 0, result.stderr[-2000:]
    a, b = saved_weights(straight), saved_weights(out)
    for k in a:
        assert torch.equal(a[k], b[k]), f"the killed-and-resumed run differs on {k}"
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    ref = [json.loads(line) for line in open(os.path.join(straight, "metrics.jsonl"))]
    assert [r["em"] for r in rows] == [r["em"] for r in ref]


def test_resume_refuses_another_stage_and_changed_settings_unless_overridden(world, retriever, model_dirs,
                                                                             tmp_path, tokenizer, fixed_rollouts,
                                                                             rl_config):
    questions, dist = world.train[:6], ddp.Dist()
    run = str(tmp_path / "rl")
    cfg = rl_config(lr=1e-4, group_size=2)
    rl.train_rl(model_dirs["student"], model_dirs["teacher"], questions, retriever, cfg, dist,
                loop.Run(run, stop_after=2))
    changed = rl_config(lr=5e-2, group_size=4, beta=0.5)
    with pytest.raises(ValueError, match=r"group_size: 2 -> 4; lr: 0.0001 -> 0.05.*--override-config"):
        rl.train_rl(model_dirs["student"], model_dirs["teacher"], questions, retriever, changed, dist,
                    loop.Run(run, resume=run))
    # the free settings may change: how often to evaluate or save, how big a forward pass is
    rl.train_rl(model_dirs["student"], model_dirs["teacher"], questions, retriever,
                rl_config(lr=1e-4, micro_batch_size=1, save_every=1), dist, loop.Run(run, resume=run, stop_after=1))
    rl.train_rl(model_dirs["student"], model_dirs["teacher"], questions, retriever, changed, dist,
                loop.Run(run, resume=run, override_config=True))
    rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    override = next(r for r in rows if "config_override" in r)
    assert override["step"] == 3 and override["config_override"]["lr"] == [1e-4, 5e-2]
    assert [r["step"] for r in rows if "em" in r] == [1, 2, 3, 4]
    assert rows[-1]["lr"] == pytest.approx(5e-2)          # the optimizer really uses the new lr
    state = torch.load(os.path.join(run, "trainer_state.pt"), weights_only=False)
    assert state["config"]["lr"] == 5e-2 and state["config_hash"] == checkpoint.config_hash(state["config"])
    # another stage's checkpoint cannot be continued, either way round
    model = models.load_model(run, dist, trainable=True)
    sup = sft.SupervisedConfig(steps=6, batch_size=4, micro_batch_size=2)
    with pytest.raises(ValueError, match="a checkpoint of stage 'rl'; this is stage 'kd'"):
        sft.train_supervised(model, tokenizer, data.load_trajectories(fixed_rollouts), sup, dist,
                             loop.Run(run, resume=run), desc="kd")
    kd = str(tmp_path / "kd")
    sft.train_supervised(model, tokenizer, data.load_trajectories(fixed_rollouts), sup, dist,
                         loop.Run(kd, stop_after=1), desc="kd")
    with pytest.raises(ValueError, match="a checkpoint of stage 'kd'; this is stage 'rl'"):
        rl.train_rl(model_dirs["student"], model_dirs["teacher"], questions, retriever, cfg, dist,
                    loop.Run(kd, resume=kd))


def test_an_existing_output_is_refused_before_any_work_unless_resumed_or_overwritten(world, retriever,
                                                                                     model_dirs, tmp_path, rl_config):
    questions, dist = world.train[:6], ddp.Dist()
    run = str(tmp_path / "rl")
    rl.train_rl(model_dirs["student"], None, questions, retriever, rl_config(steps=1, teacher_mode="none"),
                dist, loop.Run(run))
    with pytest.raises(ValueError, match=r"--out .*rl: exists and is not empty; pass --resume .* or --overwrite"):
        rl.train_rl(model_dirs["student"], None, questions, retriever, rl_config(steps=1, teacher_mode="none"),
                    dist, loop.Run(run))
    rl.train_rl(model_dirs["student"], None, questions, retriever, rl_config(steps=1, teacher_mode="none"),
                dist, loop.Run(run, overwrite=True))
    assert [json.loads(line)["step"] for line in open(os.path.join(run, "metrics.jsonl"))] == [1]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match="not a directory this trainer wrote"):
        rl.train_rl(model_dirs["student"], None, questions, retriever, rl_config(steps=1, teacher_mode="none"),
                    dist, loop.Run(str(foreign), overwrite=True))
    assert (foreign / "notes.txt").read_text() == "precious"


def _cli(*args, timeout=120):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_tgo_refuses_an_existing_output_before_rolling_out(tmp_path, model_dirs, world):
    data.write_jsonl(str(tmp_path / "q.jsonl"), world.train[:2])
    data.write_jsonl(str(tmp_path / "c.jsonl"), world.corpus[:50])
    (tmp_path / "tgo.jsonl").write_text("{}\n")
    for out, message in [(tmp_path, "is a directory"), (tmp_path / "tgo.jsonl", "exists; pass --overwrite")]:
        result = _cli("tgo", "--teacher", model_dirs["teacher"], "--data", str(tmp_path / "q.jsonl"),
                      "--corpus", str(tmp_path / "c.jsonl"), "--out", str(out))
        assert result.returncode != 0 and message in result.stderr, result.stderr[-1500:]
        assert "tgo:" not in result.stdout                 # no rollout ran


@pytest.mark.parametrize("args, message", [
    (["--beta", "-1"], "--beta: must be >= 0"),
    (["--grad-clip", "0"], "--grad-clip: must be > 0"),
    (["--steps", "0"], "--steps: must be >= 1"),
    (["--steps", "-1"], "--steps: must be >= 1"),
    (["--temperature", "0"], "--temperature 0.0: RL samples"),
    (["--group-size", "1"], "--group-size 1: GRPO"),
    (["--group-size", "0"], "--group-size: must be >= 1"),
    (["--micro-batch-size", "0"], "--micro-batch-size: must be >= 1"),
    (["--clip-low", "-0.1"], "--clip-low: must be in [0, 1)"),
    (["--clip-high", "-0.1"], "--clip-high: must be >= 0"),
    (["--top-p", "0"], "--top-p: must be in (0, 1]"),
    (["--eval-every", "5"], "--eval-every needs --val"),
    (["--override-config"], "--override-config only makes sense with --resume"),
    # the combinations rl.check_rl_settings refuses, said before any model loads
    (["--algo", "ppo", "--group-size", "1", "--drop-constant-groups"], "--drop-constant-groups is for --algo grpo"),
    (["--probe-samples", "2"], "--probe-samples and --pool-eval-limit act at every evaluation"),
])
def test_nonsense_rl_values_are_refused_at_parse_time_with_the_reason(args, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["rl", "--student", "s", "--data", "d", "--out", "o", *args])
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_help_shows_every_numeric_range():
    shown = _cli("rl", "--help").stdout
    assert "--beta BETA" in shown and "(>= 0, default: 0.001)" in shown and "(> 0, default: 1.0)" in shown


@pytest.mark.slow
def test_every_config_option_is_explained_in_help_by_its_fields_help():
    for stage, config_cls in [("rl", rl.RLConfig), ("kd", sft.SupervisedConfig), ("tgo", RolloutConfig)]:
        helps = {f.name: f.metadata.get("help") for f in dataclasses.fields(config_cls)}
        assert all(helps.values()), [name for name, text in helps.items() if not text]   # every option explained
        # argparse wraps lines, and may break one after a hyphen ("micro-" / "token-mean")
        shown = re.sub(r"-\s+", "-", " ".join(_cli(stage, "--help").stdout.split()))
        for name, text in helps.items():
            assert re.sub(r"-\s+", "-", " ".join(text.split())) in shown, (stage, name)
    assert {f.name: f for f in dataclasses.fields(rl.RLConfig)}["critic_lr"].metadata["help"] == \
        "PPO's critic (the paper: 1e-5)"


def test_long_questions_are_refused_before_any_rollout(world, retriever, model_dirs, tmp_path, tokenizer, rl_config):
    huge = {**world.train[0], "id": "huge", "question": "Who founded " + "Velmor " * 150_000 + "Works?"}
    model = models.load_model(model_dirs["student"], ddp.Dist(), trainable=False)
    assert model.config.max_position_embeddings == 2048
    with pytest.raises(ValueError, match=r"training question id='huge'.*prompt is \d+ tokens.*budget of 2048"):
        rl.train_rl(model_dirs["student"], None, [world.train[1], huge], retriever,
                    rl_config(teacher_mode="none"), ddp.Dist(), loop.Run(str(tmp_path / "rl")))
    with pytest.raises(ValueError, match=r"question id='huge' .*its prompt is \d+ tokens.*budget of 2048"):
        arc_eval.evaluate(model, tokenizer, [huge], retriever, progress=False)
    longer = {**huge, "question": "Who founded " + "Velmor " * 800 + "Works?"}   # ~2,500 tokens > 2048
    with pytest.raises(ValueError, match="id='huge'"):
        arc_eval.evaluate(model, tokenizer, [longer], retriever, progress=False)
    # with an explicit budget the same cap applies: a question that fits is rolled out within it
    records, _ = arc_eval.evaluate(model, tokenizer, world.test[:1], retriever,
                                   RolloutConfig(max_turns=1, max_new_tokens=4, max_total_tokens=300), probe=False,
                                   progress=False)
    assert len(records[0]["input_ids"]) <= 300


@pytest.mark.slow
def test_model_arguments_get_one_clear_message(model_dirs, tmp_path):
    result = _cli("kd", "--student", str(tmp_path / "missing"), "--teacher", model_dirs["teacher"], "--data", "x",
                  "--out", str(tmp_path / "kd"))
    assert f"--student {tmp_path / 'missing'}: not a model directory" in result.stderr, result.stderr[-1500:]
    result = _cli("kd", "--student", "nobody/no-such-model", "--teacher", model_dirs["teacher"], "--data", "x",
                  "--out", str(tmp_path / "kd2"))
    assert "--student nobody/no-such-model: neither a local model directory nor a Hub id" in result.stderr, \
        result.stderr[-1500:]
    result = _cli("kd", "--student", model_dirs["student"], "--teacher", model_dirs["teacher"], "--data", "x",
                  "--out", str(tmp_path / "kd3"), "--resume", str(tmp_path / "nowhere"))
    assert "--resume" in result.stderr and "not a model directory" in result.stderr, result.stderr[-1500:]


@pytest.mark.filterwarnings("ignore:non-finite loss or gradient norm")
def test_a_model_with_a_nan_weight_is_refused_and_a_diverging_run_stops_without_saving(
        world, retriever, tokenizer, model_dirs, tmp_path, fixed_rollouts):
    nan_dir = str(tmp_path / "nan")
    model = models.load_model(model_dirs["student"], ddp.Dist(), trainable=True)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(nan_dir)
    tokenizer.save_pretrained(nan_dir)
    with pytest.raises(ValueError, match=r"--student .*nan: weight model.layers.0.mlp.up_proj.weight holds NaN"):
        models.load_model(nan_dir, ddp.Dist(), trainable=True, arg="--student")
    # a run whose every loss is non-finite skips steps, then stops, saving nothing
    out = str(tmp_path / "sft")
    records = data.load_trajectories(fixed_rollouts)
    cfg = sft.SupervisedConfig(steps=50, batch_size=2, micro_batch_size=2)
    with pytest.raises(RuntimeError, match="10 consecutive steps had a non-finite loss"):
        sft.train_supervised(model, tokenizer, records, cfg, ddp.Dist(), loop.Run(out))
    assert not os.path.exists(os.path.join(out, "trainer_state.pt"))
    with pytest.raises(RuntimeError, match="not saving .*: weight .* holds NaN"):
        checkpoint.save_checkpoint(out, model, tokenizer, ddp.Dist(), {"step": 1})


def test_the_demo_owns_its_directory_and_can_run_twice(tmp_path):
    train.run_demo("small", str(tmp_path / "demo"), ddp.Dist())
    train.run_demo("small", str(tmp_path / "demo"), ddp.Dist())
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="was not written by the demo"):
        train.run_demo("small", str(other), ddp.Dist())


def test_kd_refuses_trajectories_made_with_another_tokenizer_of_the_same_size(tokenizer, model_dirs, fixed_rollouts,
                                                                              tmp_path):
    other_world = demo.make_world(seed=5)
    other_tok = demo.train_tokenizer(other_world)
    assert len(other_tok) == len(tokenizer) and other_tok.get_vocab() != tokenizer.get_vocab()
    student, teacher = str(tmp_path / "student"), str(tmp_path / "teacher")
    demo.make_tiny_model(other_tok, "test", seed=1, out_dir=student)
    demo.make_tiny_model(other_tok, "test", seed=2, out_dir=teacher)
    rows = [{**r, data.TOKENIZER_KEY: data.vocab_fingerprint(tokenizer)} for r in data.load_trajectories(fixed_rollouts)]
    made = str(tmp_path / "tgo.jsonl")
    data.write_jsonl(made, rows)
    args = train.parse_args(["kd", "--student", student, "--teacher", teacher, "--data", made,
                             "--out", str(tmp_path / "kd"), "--steps", "1"])
    with pytest.raises(ValueError, match=(rf"tgo.jsonl:1: made with tokenizer {data.vocab_fingerprint(tokenizer)}"
                                          rf", but the tokenizer given is {data.vocab_fingerprint(other_tok)}")):
        train.run_stage(args, ddp.Dist())
    assert not os.path.exists(tmp_path / "kd" / "trainer_state.pt")


# -----------------------------------------------------------------------------
# The head runs only at loss positions: the same losses and gradients as full logits


# -----------------------------------------------------------------------------
# PPO with a critic


@pytest.mark.slow
def test_ppo_options_are_listed_with_their_defaults_and_group_size_one_is_legal_for_ppo_only(capsys):
    shown = " ".join(_cli("rl", "--algo", "ppo", "--help").stdout.split())     # argparse wraps lines
    for flag, default in [("--critic-lr", "1e-05"), ("--critic-warmup-ratio", "0.015"), ("--value-clip", "0.5"),
                          ("--gamma", "1.0"), ("--gae-lambda", "1.0"), ("--no-whiten-advantages", "True"),
                          ("--algo {grpo,ppo}", "grpo")]:
        help_text = shown.rsplit(flag, 1)[1].split(" --", 1)[0]       # up to the next option
        assert f"default: {default})" in help_text, flag
    args = train.parse_args(["rl", "--student", "s", "--data", "d", "--out", "o", "--algo", "ppo", "--group-size", "1"])
    assert args.group_size == 1
    with pytest.raises(SystemExit):
        train.parse_args(["rl", "--student", "s", "--data", "d", "--out", "o", "--group-size", "1"])
    assert "or --algo ppo" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# Run outputs: the settings as JSON, TensorBoard / W&B, the saved dtype


def test_every_checkpoint_carries_its_settings_as_json_and_tensorboard_gets_the_metrics(tokenizer, model_dirs,
                                                                                        fixed_rollouts, tmp_path):
    pytest.importorskip("tensorboard", reason="the optional package tensorboard is not installed")
    out = tmp_path / "kd"
    args = train.parse_args(["kd", "--student", model_dirs["student"], "--teacher", model_dirs["teacher"],
                             "--data", fixed_rollouts, "--out", str(out), "--steps", "2", "--batch-size", "2",
                             "--micro-batch-size", "2", "--report-to", "tensorboard"])
    with pytest.warns(UserWarning, match="rows .* no 'tokenizer'|no tokenizer"):
        train.run_stage(args, ddp.Dist())
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["stage"] == "kd" and saved["step"] == 2 and saved["config"]["steps"] == 2
    assert saved["args"]["student"] == model_dirs["student"] and saved["config_hash"]
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("kd/loss")] == [1, 2]


def test_kd_lambda_and_gae_lambda_have_their_own_ranges():
    settings.check(sft.SupervisedConfig(lam=2.0))               # KD's λ: any weight >= 0
    with pytest.raises(ValueError, match="gae_lambda=2.0: must be in \\[0, 1\\]"):
        settings.check(rl.RLConfig(gae_lambda=2.0))


def test_stages_read_a_bm25_index_built_once(world, retriever, tmp_path):
    data.write_jsonl(str(tmp_path / "corpus.jsonl.gz"), world.corpus)
    retriever_lib.write_index(str(tmp_path / "corpus.jsonl.gz"), str(tmp_path / "index"))
    loaded = retriever_lib.make_retriever(None, None, index=str(tmp_path / "index"))
    queries = [q["question"] for q in world.test[:20]]
    assert loaded.search(queries, topk=3) == retriever.search(queries, topk=3)
    args = train.parse_args(["rl", "--student", "s", "--data", "d", "--out", "o", "--index", str(tmp_path / "index")])
    assert args.index == str(tmp_path / "index") and args.corpus is None


def test_a_hub_id_in_the_local_cache_loads_offline_in_every_stage_the_same_way(model_dirs, tmp_path, monkeypatch):
    """A Hub id resolves through the Hugging Face cache (offline here, so only a cached one can load):
    the same model as its directory, through the same loader every stage uses."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny-org--tiny-student" / "snapshots" / "0123abcd"
    shutil.copytree(model_dirs["student"], snapshot)
    (cache / "models--tiny-org--tiny-student" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-student" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    by_id = models.load_model("tiny-org/tiny-student", ddp.Dist(), trainable=False, arg="--student")
    by_dir = models.load_model(model_dirs["student"], ddp.Dist(), trainable=False, arg="--student")
    assert all(torch.equal(a, b) for a, b in zip(by_id.state_dict().values(), by_dir.state_dict().values()))
    assert models.load_tokenizer("tiny-org/tiny-student", "--student").get_vocab() == \
        models.load_tokenizer(model_dirs["student"], "--student").get_vocab()
    with pytest.raises(FileNotFoundError, match="--teacher tiny-org/not-cached: neither a local model directory"):
        models.load_model("tiny-org/not-cached", ddp.Dist(), trainable=False, arg="--teacher")


# -----------------------------------------------------------------------------
# No run, model or file is ever lost: --overwrite, corrupted state, interrupts, resumable tgo


RL_ARGS = ["--prompts-per-step", "2", "--group-size", "2", "--max-turns", "1", "--max-new-tokens", "6",
           "--micro-batch-size", "4", "--rollout-batch-size", "8", "--lr", "1e-2", "--warmup-ratio", "0", "--seed", "3"]


@pytest.fixture
def files(world, tmp_path):
    """Question and corpus files of the demo world, as a user would pass them."""
    folder = tmp_path / "files"
    folder.mkdir()
    paths = {"q": str(folder / "q.jsonl"), "q2": str(folder / "q2.jsonl"), "val": str(folder / "val.jsonl"),
             "corpus": str(folder / "corpus.jsonl")}
    data.write_jsonl(paths["q"], world.train[:6])
    data.write_jsonl(paths["q2"], world.train[6:12])
    data.write_jsonl(paths["val"], world.validation[:2])
    data.write_jsonl(paths["corpus"], world.corpus)
    return paths


def _listing(path):
    return sorted((p.relative_to(path).as_posix(), p.stat().st_size) for p in path.rglob("*"))


def _flip(path, count=200, at=4096):
    """Inverts `count` bytes of a file in place (its size unchanged): what bit rot or a bad copy does."""
    with open(path, "r+b") as f:
        f.seek(min(at, os.path.getsize(path) - count))
        chunk = f.read(count)
        f.seek(-len(chunk), 1)
        f.write(bytes(255 - b for b in chunk))


def test_overwrite_never_deletes_an_input_it_refuses_an_output_that_is_or_holds_one(model_dirs, files, world,
                                                                                    retriever, tmp_path, rl_config):
    x = tmp_path / "x"
    shutil.copytree(model_dirs["student"], x)
    before = _listing(x)
    for stage, model_flag in [("rl", "--student"), ("teacher", "--model")]:
        extra = ["--corpus", files["corpus"]] if stage == "rl" else []
        with pytest.raises(ValueError, match=rf"--out {x}: is the input {model_flag} {x}; .*choose another --out"):
            train.main([stage, model_flag, str(x), "--data", files["q"], "--out", str(x), "--overwrite", *extra])
        assert _listing(x) == before
    run = tmp_path / "run"                                  # a run with best/: resuming best/ into the run
    rl.train_rl(model_dirs["student"], None, world.train[:6], retriever,
                rl_config(steps=1, teacher_mode="none", eval_every=1, eval_limit=2), ddp.Dist(), loop.Run(str(run)),
                validation=world.validation)
    before = _listing(run)
    with pytest.raises(ValueError, match=r"--out .*run: contains the input --resume .*run/best"):
        train.main(["rl", "--student", str(x), "--teacher-mode", "none", "--data", files["q"], "--corpus",
                    files["corpus"], "--resume", str(run / "best"), "--out", str(run), "--overwrite",
                    "--steps", "1", "--eval-every", "1", "--eval-limit", "2", "--val", files["val"], *RL_ARGS])
    assert _listing(run) == before
    questions = open(files["q"]).read()
    with pytest.raises(ValueError, match=r"--out .*q.jsonl: is the input --data"):
        train.main(["tgo", "--teacher", str(x), "--data", files["q"], "--corpus", files["corpus"], "--out", files["q"],
                    "--overwrite"])
    assert open(files["q"]).read() == questions


def test_overwrite_replaces_only_a_run_directory_and_only_what_the_run_wrote(model_dirs, world, retriever, tmp_path,
                                                                             rl_config):
    cfg, dist = rl_config(steps=1, teacher_mode="none"), ddp.Dist()
    foreign = tmp_path / "mine"                         # somebody's directory that happens to hold metrics.jsonl
    foreign.mkdir()
    (foreign / "metrics.jsonl").write_text('{"step": 1}\n')
    (foreign / "notes.txt").write_text("precious")
    with pytest.raises(ValueError, match="not a directory this trainer wrote.*choose another --out"):
        rl.train_rl(model_dirs["student"], None, world.train[:6], retriever, cfg, dist,
                    loop.Run(str(foreign), overwrite=True))
    assert _listing(foreign) == [("metrics.jsonl", 12), ("notes.txt", 8)]
    run = tmp_path / "run"
    rl.train_rl(model_dirs["student"], None, world.train[:6], retriever, cfg, dist, loop.Run(str(run)))
    (run / "notes.txt").write_text("mine too")          # the user's own file in a run directory
    rl.train_rl(model_dirs["student"], None, world.train[:6], retriever, cfg, dist, loop.Run(str(run), overwrite=True))
    assert (run / "notes.txt").read_text() == "mine too"
    assert [json.loads(line)["step"] for line in open(run / "metrics.jsonl")] == [1]
    # the hint names the command that works: a run without a checkpoint cannot be resumed
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / checkpoint.RUN_MARKER).write_text("")
    (stopped / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match="saved no checkpoint to resume .*pass --overwrite") as error:
        checkpoint.check_output(str(stopped), None, False)
    assert "--resume" not in str(error.value)
    with pytest.raises(FileNotFoundError, match=r"--resume .*stopped: no checkpoint to resume from in it"):
        rl.train_rl(model_dirs["student"], None, world.train[:6], retriever, cfg, dist,
                    loop.Run(str(stopped), resume=str(stopped)))


def test_a_corrupted_checkpoint_is_refused_on_resume_naming_the_file(model_dirs, world, retriever, tmp_path,
                                                                     tokenizer, rl_config):
    cfg, dist = rl_config(steps=2), ddp.Dist()
    run = tmp_path / "run"
    rl.train_rl(model_dirs["student"], model_dirs["teacher"], world.train[:6], retriever, cfg, dist,
                loop.Run(str(run), stop_after=1))
    shutil.copytree(run, tmp_path / "run2")
    _flip(run / "trainer_state.pt")                      # torch.load would read it without a word
    with pytest.raises(ValueError, match=r"run/trainer_state.pt: corrupted, its checksum differs"):
        rl.train_rl(model_dirs["student"], model_dirs["teacher"], world.train[:6], retriever, cfg, dist,
                    loop.Run(str(run), resume=str(run)))
    _flip(tmp_path / "run2" / "model.safetensors")
    with pytest.raises(ValueError, match=r"run2/model.safetensors: corrupted"):
        rl.train_rl(model_dirs["student"], model_dirs["teacher"], world.train[:6], retriever, cfg, dist,
                    loop.Run(str(tmp_path / "run2"), resume=str(tmp_path / "run2")))
    # a model directory without checksums (save_pretrained by anyone) with damaged weights: named too
    plain = tmp_path / "plain"
    shutil.copytree(model_dirs["student"], plain)
    with open(plain / "model.safetensors", "r+b") as f:
        f.write(b"\xff" * 64)                            # the header's length: nonsense
    with pytest.raises(ValueError, match=r"--student .*plain: cannot load the model from model.safetensors"):
        models.load_model(str(plain), dist, trainable=True, arg="--student")


def test_resume_drops_a_torn_last_metrics_line_and_says_so(model_dirs, world, retriever, tmp_path, rl_config):
    cfg, dist = rl_config(steps=2, teacher_mode="none"), ddp.Dist()
    run = tmp_path / "run"
    rl.train_rl(model_dirs["student"], None, world.train[:6], retriever, cfg, dist, loop.Run(str(run), stop_after=1))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "reward": 0.')               # a full disk in the middle of an append
    with pytest.warns(UserWarning, match="torn last line"):
        summary = rl.train_rl(model_dirs["student"], None, world.train[:6], retriever, cfg, dist,
                              loop.Run(str(run), resume=str(run)))
    assert [json.loads(line)["step"] for line in open(run / "metrics.jsonl")] == [1, 2]
    assert "best_val_em" not in summary                  # no validation: no best to report (was -1.0)


def _wait_for_line(path, proc, timeout=240):
    """Waits until `path` holds a complete line (or the process ends)."""
    import time
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if os.path.isfile(path) and open(path).read().endswith("\n"):
            return True
        time.sleep(0.02)
    return False


@pytest.mark.slow
def test_sigterm_during_rl_finishes_the_step_saves_and_names_the_command_that_continues_it(model_dirs, files,
                                                                                           tmp_path, saved_weights):
    """SIGTERM (what a scheduler sends; Ctrl-C is SIGINT, handled alike) after the first step: the run
    saves a resumable checkpoint, exits 143 with one line naming the exact command to continue, and
    that command finishes the run where an uninterrupted one ends."""
    import shlex
    import signal
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    common = ["rl", "--student", model_dirs["student"], "--teacher", model_dirs["teacher"], "--data", files["q"],
              "--corpus", files["corpus"], "--steps", "8", *RL_ARGS]
    out = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "train.py", *common, "--out", out], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_for_line(os.path.join(out, "metrics.jsonl"), proc), "the run ended before its first step"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: SIGTERM: rl stopped after step ") and f"saved a resumable checkpoint in {out}" in last
    step = torch.load(os.path.join(out, "trainer_state.pt"), weights_only=False)["step"]
    assert 1 <= step < 8 and f"after step {step} of 8" in last
    command = shlex.split(last.split("continue with: ", 1)[1])
    assert command[-2:] == ["--resume", out] and "--overwrite" not in command
    resumed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = str(tmp_path / "straight")
    train.main([*common, "--out", straight])
    a, b = saved_weights(straight), saved_weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a), "the interrupted and resumed run differs"
    assert [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))] == list(range(1, 9))


def test_resume_refuses_another_data_file_or_teacher_unless_overridden_and_logs_it(model_dirs, files, tmp_path):
    out = str(tmp_path / "run")
    base = ["rl", "--student", model_dirs["student"], "--corpus", files["corpus"], "--steps", "3", *RL_ARGS]
    train.main([*base, "--teacher", model_dirs["teacher"], "--data", files["q"], "--out", out, "--stop-after", "1"])
    with pytest.raises(ValueError, match=r"these inputs differ .*--data .*q2.jsonl \(.*6 rows.*\) \(was .*q.jsonl"):
        train.main([*base, "--teacher", model_dirs["teacher"], "--data", files["q2"], "--out", out, "--resume", out,
                    "--stop-after", "1"])
    with pytest.raises(ValueError, match=r"these inputs differ .*--teacher .*student"):
        train.main([*base, "--teacher", model_dirs["student"], "--data", files["q"], "--out", out, "--resume", out,
                    "--stop-after", "1"])
    train.main([*base, "--teacher", model_dirs["teacher"], "--data", files["q2"], "--out", out, "--resume", out,
                "--override-config"])
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    [logged] = [r for r in rows if "input_override" in r]
    assert logged["step"] == 1 and list(logged["input_override"]) == ["--data"]
    state = torch.load(os.path.join(out, "trainer_state.pt"), weights_only=False)
    assert state["step"] == 3 and state["inputs"]["--data"]["path"] == files["q2"]


@pytest.mark.filterwarnings("ignore:non-finite loss or gradient norm")
def test_learning_rates_that_destroy_the_model_are_refused_and_an_update_that_breaks_a_weight_stops(
        model_dirs, tokenizer, fixed_rollouts):
    for flag, value, message in [("--lr", "inf", "must be finite and in [0, 1], got inf"),
                                 ("--lr", "1e30", "must be in [0, 1], got 1e30"),
                                 ("--lr", "-1e-3", "must be in [0, 1], got -1e-3"),
                                 ("--weight-decay", "nan", "must be finite and in [0, 1], got nan")]:
        with pytest.raises(SystemExit):
            train.parse_args(["rl", "--student", "s", "--data", "d", "--out", "o", flag, value])
    with pytest.raises(ValueError, match=r"RLConfig.lr=inf: must be finite"):
        settings.check(rl.RLConfig(lr=float("inf")))
    # the guard after an update: a step that leaves a weight non-finite stops the run, naming it
    model = models.load_model(model_dirs["student"], ddp.Dist(), trainable=True)
    records = data.load_trajectories(fixed_rollouts)[:2]
    loss, _ = sft.supervised_loss(model, None, records, 1.0, len(tokenizer), 1.0, ddp.Dist())
    loss.backward()
    optimizer = torch.optim.SGD(model.parameters(), lr=3e38)       # finite gradients, an overflowing step
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(cli.Stopped, match=r"made weight .* NaN or inf .*stopping without saving"):
        loop.optimizer_step(model, optimizer, scheduler, 1e30, {}, ddp.Dist())


def test_argument_errors_are_one_line_and_negative_numbers_reach_the_range_check(capsys):
    with pytest.raises(SystemExit) as exit_:
        train.parse_args(["rl", "--student", "s", "--data", "d", "--out", "o", "--lr", "-1e-3"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "usage:" not in err
    assert "train.py rl: error: argument --lr: must be in [0, 1], got -1e-3 (see train.py rl --help)" in err
    assert "expected one argument" not in err
    args = train.parse_args(["rl", "--student", "s", "--data", "d", "--out", "o", "--beta", "0", "--seed", "2"])
    assert (args.beta, args.seed, args.lr) == (0.0, 2, 1e-6)
    for stage, extra in [("kd", ["--teacher", "t"]), ("teacher", [])]:
        flag = "--model" if stage == "teacher" else "--student"
        for args_, message in [(["--eval-every", "2"], "--eval-every needs --heldout FILE"),
                               (["--override-config"], "--override-config only makes sense with --resume")]:
            with pytest.raises(SystemExit):
                train.parse_args([stage, flag, "s", *extra, "--data", "d", "--out", "o", *args_])
            assert message in capsys.readouterr().err


@pytest.mark.slow
def test_command_line_errors_print_one_line_and_exit_2_and_debug_shows_the_traceback(tmp_path):
    args = ["kd", "--student", str(tmp_path / "missing"), "--teacher", "t", "--data", "x", "--out", str(tmp_path / "o")]
    result = _cli(*args)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-1500:]
    assert result.stderr.strip().splitlines()[-1] == f"error: --student {tmp_path / 'missing'}: not a model directory " \
                                                     "(and not a Hub id of the form org/name)"
    debug = _cli(*args, "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "FileNotFoundError" in debug.stderr


def test_rl_checks_settings_output_and_models_before_building_the_retriever(model_dirs, files, tmp_path,
                                                                            monkeypatch):
    built = []
    monkeypatch.setattr(retriever_lib, "make_retriever", lambda *a, **k: built.append(a) or pytest.fail("built"))
    base = ["rl", "--teacher-mode", "none", "--data", files["q"], "--retriever-url", "http://127.0.0.1:9/retrieve",
            *RL_ARGS]
    (tmp_path / "file").write_text("x")
    for extra, error, message in [
            (["--student", model_dirs["student"], "--out", str(tmp_path / "file" / "run")], ValueError,
             "cannot be created, .*file is a file"),
            (["--student", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")], FileNotFoundError,
             "not a model directory"),
            (["--student", model_dirs["student"], "--out", str(tmp_path / "run"), "--prompts-per-step", "3",
              "--mini-batches", "2"], ValueError, "cannot form 2 equal mini-batches")]:
        with pytest.raises(error, match=message):
            train.main([*base, *extra])
    assert built == [] and not os.path.exists(tmp_path / "run")


@pytest.mark.filterwarnings("ignore:.*record no 'tokenizer' fingerprint")
def test_supervised_stages_refuse_trajectories_without_a_loss_token_and_the_demo_a_file_as_out(
        model_dirs, fixed_rollouts, tmp_path):
    rows = [{**r, "loss_mask": [0] * len(r["loss_mask"])} for r in data.load_trajectories(fixed_rollouts)]
    data.write_jsonl(str(tmp_path / "empty.jsonl"), rows)
    with pytest.raises(ValueError, match=r"--data .*empty.jsonl: no row has a loss token"):
        train.main(["teacher", "--model", model_dirs["student"], "--data", str(tmp_path / "empty.jsonl"),
                    "--out", str(tmp_path / "t")])
    assert not os.path.exists(tmp_path / "t")
    (tmp_path / "taken").write_text("x")
    with pytest.raises(ValueError, match=r"--out .*taken: exists and is not a directory"):
        train.main(["demo", "--preset", "small", "--out", str(tmp_path / "taken")])


@pytest.mark.slow
def test_retrieval_client_options_reach_the_client_and_are_range_checked(monkeypatch):
    """--retriever-retry-seconds / --retriever-timeout go to the HTTP client of every stage that
    searches; a timeout of 0 is refused at parse time."""
    seen = []
    monkeypatch.setattr(retriever_lib, "make_retriever", lambda *a, **k: seen.append(k))
    for stage in (["rl", "--student", "s", "--teacher", "t", "--out", "o"], ["tgo", "--teacher", "t", "--out", "o"]):
        args = train.parse_args([*stage, "--data", "q.jsonl", "--retriever-url", "http://127.0.0.1:9/retrieve",
                                 "--retriever-retry-seconds", "7", "--retriever-timeout", "2.5"])
        train.retriever_from_args(args, 3, ddp.Dist())()
        # under torchrun a server gets one caller (rank 0) by default; --retrieval-caller each opts out
        two_ranks = ddp.Dist(rank=1, world_size=2)
        assert isinstance(train.retriever_from_args(args, 3, two_ranks)(), ddp.OneCallerRetriever)
        args.retrieval_caller = "each"
        assert not isinstance(train.retriever_from_args(args, 3, two_ranks)(), ddp.OneCallerRetriever)
    assert [(k["retry_seconds"], k["timeout"]) for k in seen] == [(7.0, 2.5)] * 6
    defaults = train.parse_args(["tgo", "--teacher", "t", "--out", "o", "--data", "q.jsonl"])
    assert (defaults.retriever_retry_seconds, defaults.retriever_timeout) == (300.0, None)
    shown = subprocess.run([sys.executable, "arc_metric.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert "--retriever-retry-seconds" in shown.stdout and "--retriever-timeout" in shown.stdout   # eval's parser
    bad = _cli("rl", "--student", "s", "--out", "o", "--data", "q.jsonl", "--retriever-timeout", "0")
    assert bad.returncode == 2 and "--retriever-timeout: must be > 0" in bad.stderr, bad.stderr


def test_default_demo_has_the_large_heldout_splits_and_an_rl_pool_it_never_repeats():
    """The default demo's world holds ≥ 1,000 test and ≥ 500 validation questions (test EM's standard
    error ≤ 0.016) besides its KD and RL pools, disjoint, and its RL stage draws no question twice."""
    preset = train.PRESETS["default"]()
    world = demo.make_world(seed=preset.world_seed, n_test=preset.n_test, n_validation=preset.n_validation,
                            scale=preset.world_scale)
    assert len(world.test) >= 1000 and len(world.validation) >= 500
    assert 0.5 / len(world.test) ** 0.5 <= 0.016
    kd, rl_pool, validation, test = train.question_pools(world, preset)
    assert (len(kd), len(rl_pool), len(validation), len(test)) == (preset.kd_pool, preset.rl_pool, 500, 1000)
    ids = [{q["id"] for q in split} for split in (kd, rl_pool, validation, test)]
    assert sum(map(len, ids)) == len(set().union(*ids))                   # disjoint by question
    questions = [{q["question"] for q in split} for split in (kd, rl_pool, validation, test)]
    assert sum(map(len, questions)) == len(set().union(*questions))       # and by question text
    assert preset.rl["steps"] * preset.rl["prompts_per_step"] <= len(rl_pool)
    rl.RLConfig(**preset.rl)                                              # legal settings


def test_the_oracle_no_think_share_reaches_the_teachers_trajectories(world, tokenizer, retriever):
    """DemoPreset.oracle_no_think → oracle_trajectories: exactly the questions answers_without_thought
    picks end with a bare answer after their last observation; every other one thinks first."""
    w = train.DemoWorld(dataclasses.replace(world, train=world.train[:60]), tokenizer, retriever, [], [], [], [],
                        rollout.RolloutConfig(greedy=True))
    records = train.oracle_trajectories(w, 0.5)
    direct = [demo.answers_without_thought(r["question"], 0.5) for r in records]
    assert 0 < sum(direct) < len(records)
    for r, bare in zip(records, direct):
        after = tokenizer.decode(r["input_ids"][r["prompt_length"]:]).rsplit("</information>", 1)[-1]
        assert ("<think>" not in after) == bare and "<answer>" in after, after
    assert train.oracle_trajectories(w) == train.oracle_trajectories(w, 0.0)
