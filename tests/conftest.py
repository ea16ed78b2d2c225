"""Shared test set-up: never touch the network; tiny worlds, tokenizers and models built locally."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import arc_eval  # noqa: E402
import data  # noqa: E402
import ddp  # noqa: E402
import demo  # noqa: E402
import models  # noqa: E402
import rl  # noqa: E402
from retriever import BM25Retriever  # noqa: E402
from rollout import RolloutConfig  # noqa: E402


@pytest.fixture(scope="session")
def world():
    """The demo world at seed 0 (deterministic; ~2 s to build)."""
    return demo.make_world(seed=0)


@pytest.fixture(scope="session")
def tokenizer(world):
    """A byte-level BPE tokenizer trained on the world; protocol tags are ordinary multi-piece text."""
    return demo.train_tokenizer(world)


@pytest.fixture(scope="session")
def retriever(world):
    return BM25Retriever(world.corpus)


@pytest.fixture
def tiny_model(tokenizer):
    """A randomly initialised 2-layer Qwen2 (hidden 32), fp32, eval mode. Fresh per test."""
    return demo.make_tiny_model(tokenizer, size="test", seed=0).eval()


@pytest.fixture(scope="module")
def model_dirs(tokenizer, tmp_path_factory):
    """A test-size student and a differently initialised test-size teacher, as HF directories
    (one pair per test module: a module may train from them, never into them)."""
    root = tmp_path_factory.mktemp("models")
    dirs = {"student": str(root / "student"), "teacher": str(root / "teacher")}
    demo.make_tiny_model(tokenizer, "test", seed=11, out_dir=dirs["student"])
    demo.make_tiny_model(tokenizer, "test", seed=12, out_dir=dirs["teacher"])
    return dirs


def _segments(traj) -> list[tuple[int, list[int]]]:
    """The response as maximal runs of equal loss mask: [(mask, ids), ...]."""
    runs = []
    for token, m in zip(traj.input_ids[traj.prompt_length:], traj.loss_mask[traj.prompt_length:]):
        if runs and runs[-1][0] == m:
            runs[-1][1].append(token)
        else:
            runs.append((m, [token]))
    return runs


@pytest.fixture(scope="session")
def segments():
    """A trajectory's response as maximal runs of equal loss mask, [(mask, ids), ...] (rollout tests)."""
    return _segments


@pytest.fixture(scope="module")
def fixed_rollouts(world, tokenizer, retriever, model_dirs, tmp_path_factory):
    """16 sampled rollouts of the tiny student (8 groups of G = 2) with hand-set EM: mixed groups,
    all-right and all-wrong groups, so the surrogate and the selective teacher term both act."""
    model = models.load_model(model_dirs["student"], ddp.Dist(), trainable=False)
    questions = world.train[:8]
    expanded = [q for q in questions for _ in range(2)]
    records = arc_eval.generate_records(model, tokenizer, expanded, retriever,
                                        RolloutConfig(max_turns=1, max_new_tokens=12, seed=0), ddp.Dist(), 16)
    em_pattern = [1, 0, 0, 0, 1, 1, 0, 1, 0, 0, 1, 0, 0, 0, 1, 1]
    for i, r in enumerate(records):
        r["group"], r["em"] = 100 + i // 2, float(em_pattern[i])
    path = str(tmp_path_factory.mktemp("rollouts") / "rollouts.jsonl")
    data.write_jsonl(path, records)
    return path


@pytest.fixture(scope="session")
def rl_config():
    """rl.RLConfig with the small settings most stage tests run: rl_config(steps=2, ...) overrides them."""
    def make(**kw):
        base = dict(steps=4, prompts_per_step=2, group_size=2, micro_batch_size=2, rollout_batch_size=4,
                    lr=1e-2, warmup_ratio=0.5, beta=0.5, temperature=1.0, max_turns=1, max_new_tokens=6,
                    seed=3)
        return rl.RLConfig(**{**base, **kw})
    return make


@pytest.fixture(scope="session")
def saved_weights():
    """The state dict of the model saved in a directory, loaded afresh: saved_weights(path)."""
    def load(path):
        return AutoModelForCausalLM.from_pretrained(path).state_dict()
    return load


@pytest.fixture
def straight_and_resumed(tmp_path):
    """A trainer run twice in this process, at one thread count (so bit for bit is a fair demand of
    resume): straight through, and stopped after `stop_after` steps then resumed from its own
    checkpoint. straight_and_resumed(train, stop_after) → (straight_dir, split_dir, the trainer state
    saved at the stop); train(out, **kw) runs the trainer into `out`, passing on stop_after / resume."""
    def run(train, stop_after: int):
        straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
        train(straight)
        train(split, stop_after=stop_after)
        state = torch.load(os.path.join(split, "trainer_state.pt"), weights_only=False)
        train(split, resume=split)
        return straight, split, state
    return run
