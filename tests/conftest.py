"""Shared test set-up: never touch the network; tiny worlds, tokenizers and models built locally."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

import demo  # noqa: E402
from retriever import BM25Retriever  # noqa: E402


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
