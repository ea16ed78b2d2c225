"""Rank-parallel rollouts against one retrieval server, run by tests/test_ddp.py under torchrun (gloo,
CPU). The model is a script (rollout._generate_turn replaced): each row searches 1 + len(question) % 3
times, "<search> {question} {k} </search>", then answers, so the ranks run different numbers of
searching turns and, with unequal shares, different numbers of chunks. Each rank writes its records'
queries and hits to OUT/rank{r}.json.

    python -m torch.distributed.run --nproc_per_node=2 tests/ddp_one_caller.py TOKENIZER QUESTIONS URL OUT CALLER
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import arc_eval  # noqa: E402
import data  # noqa: E402
import ddp  # noqa: E402
import models  # noqa: E402
import retriever as retriever_lib  # noqa: E402
import rollout  # noqa: E402


def scripted_turn(model, tokenizer, rows, config, stop_ids, generator, device):
    """One turn of every playing row, written by the script instead of sampled."""
    for r in rows:
        done, wanted = r.traj.num_searches, 1 + len(r.traj.question) % 3
        text = f"<search> {r.traj.question} {done} </search>" if done < wanted else "<answer> a </answer>"
        ids = rollout.encode_text(tokenizer, text)
        r.append(ids, sampled=True)
        r.turn_ids, r.turn_end = list(ids), "search" if done < wanted else "answer"


def main(tokenizer_dir, questions_path, url, out, caller):
    dist = ddp.setup()
    rollout._generate_turn = scripted_turn
    tokenizer = models.load_tokenizer(tokenizer_dir)
    retriever = retriever_lib.HTTPRetriever(url, retry_seconds=0)
    if caller == "one":
        retriever = ddp.OneCallerRetriever(retriever, dist)
    questions = data.load_questions(questions_path)
    shard = questions[dist.rank::dist.world_size]
    config = rollout.RolloutConfig(max_turns=4, max_new_tokens=32, greedy=True)
    try:
        records = arc_eval.generate_records(torch.nn.Linear(1, 1), tokenizer, shard, retriever, config, dist,
                                            batch_size=2)
        with open(os.path.join(out, f"rank{dist.rank}.json"), "w") as f:
            json.dump([{"question": r["question"], "queries": r["queries"], "hits": r["hits"]} for r in records], f)
    finally:
        # a rank that leaves a gloo group without closing it can abort ("terminate called without an
        # active exception") while the other rank is still in its last collective
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
