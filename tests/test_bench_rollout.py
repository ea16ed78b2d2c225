"""bench/bench_rollout.py's reference decoders compute what they claim: the ragged replay feeds the
rollout's own rows (prompts, written tokens, observations, nudges) with the same cache, padding and
positions, so a greedy replay's every argmax is the token the rollout wrote."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import bench_rollout  # noqa: E402
from rollout import rollout  # noqa: E402
from test_rollout import ScriptedLM, ScriptedRetriever, greedy, random_qwen2, say  # noqa: E402


def test_ragged_replay_feeds_the_rollouts_tokens_and_reproduces_every_greedy_one(world, tokenizer):
    """Rows that search twice, once, hit the budget and an eos, or answer at once: the replay feeds
    exactly the tokens the rollout fed (the scripted model checks padding and positions at every
    call) and its argmax equals the written token at every step it checks."""
    questions = [q["question"] for q in world.test[:4]]
    turns = [[(3, "<search> alpha </search>\n"), (4, "<search> beta gamma </search>\n"), (2, "<answer> d </answer>")],
             [(7, "<search> one </search>\n"), (1, "<answer> x </answer>\n")],
             [(40,), ("<search> kappa </search>",), (4, "eos"), ("<answer> z </answer>",)],   # budget 16, then eos
             [("<answer> now </answer>",)]]
    scripts = {q: [say(tokenizer, *turn) for turn in row] for q, row in zip(questions, turns)}
    model = ScriptedLM(tokenizer, scripts, inner=random_qwen2(tokenizer))
    config = greedy()
    trajs = rollout(model, tokenizer, questions, ScriptedRetriever(), config)
    fed_by_rollout, model.fed = model.fed, 0
    differed = []
    written = bench_rollout.ragged_replay(model, tokenizer, trajs, config, differed)
    assert written == sum(sum(t.loss_mask) for t in trajs)
    assert model.fed == fed_by_rollout and differed == [0]
    start, segments = bench_rollout.turn_segments(trajs[0])
    assert len(start) == trajs[0].prompt_length and len(segments) == 3 and segments[-1][1] == []


def test_ragged_replay_runs_the_rollouts_forwards_and_one_fewer_per_dropped_eos(world, tokenizer):
    """One row alone (no batch to hide a difference): the same forwards as the rollout, except the one
    the rollout spends sampling an eos that the trajectory drops."""
    question = world.test[0]["question"]
    for turns, fewer in (([(3, "<search> alpha </search>\n"), (2, "<answer> d </answer>")], 0),
                         ([(3, "eos"), (2, "<answer> d </answer>")], 1)):
        model = ScriptedLM(tokenizer, {question: [say(tokenizer, *turn) for turn in turns]},
                           inner=random_qwen2(tokenizer))
        trajs = rollout(model, tokenizer, [question], ScriptedRetriever(), greedy())
        by_rollout = len(model.modes)
        bench_rollout.ragged_replay(model, tokenizer, trajs, greedy())
        assert len(model.modes) - by_rollout == by_rollout - fewer
