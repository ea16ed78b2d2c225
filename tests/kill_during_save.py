"""Runs a short RL training on test-size models and kills itself (SIGKILL, by PID) inside its N-th
checkpoint save at a chosen point, so tests/test_train.py can check that --resume always continues
from a complete checkpoint and ends where an uninterrupted run ends.

    python tests/kill_during_save.py STUDENT TEACHER OUT POINT N [RESUME]

POINT (N counts saves within this process, from 1; "none" runs to the end):
  state    half of trainer_state.pt written, then the kill (a torn zip inside the new directory)
  weights  the new weights written, the trainer state not yet
  carry    metrics.jsonl already moved into the new directory, the swap not yet done
  swap     the old checkpoint renamed away, the new one not yet renamed into place
"""
import os
import signal
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import checkpoint  # noqa: E402
import ddp  # noqa: E402
import demo  # noqa: E402
import loop  # noqa: E402
import rl  # noqa: E402
import train  # noqa: E402
from retriever import BM25Retriever  # noqa: E402

CONFIG = dict(steps=4, prompts_per_step=2, group_size=2, micro_batch_size=2, rollout_batch_size=4, lr=1e-2,
              warmup_ratio=0.5, beta=0.5, temperature=1.0, max_turns=1, max_new_tokens=6, seed=3, save_every=1)


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str, n: int) -> None:
    """Replaces one function the save goes through with a version that kills the process at the n-th save."""
    saves = {"count": 0}
    real_save, real_carry, real_rename = torch.save, checkpoint._carry, os.rename

    def counting_save(obj, path, *args, **kwargs):          # torch.save is called once per checkpoint
        saves["count"] += 1
        if saves["count"] == n and point == "weights":
            die()
        if saves["count"] == n and point == "state":
            real_save(obj, path, *args, **kwargs)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
            die()
        return real_save(obj, path, *args, **kwargs)

    def carry(source, dest, names):
        real_carry(source, dest, names)
        if saves["count"] == n and point == "carry":
            die()

    def rename(src, dst):
        real_rename(src, dst)
        if saves["count"] == n and point == "swap" and dst.endswith(".old"):
            die()

    train.torch.save = counting_save
    checkpoint._carry = carry
    checkpoint.os.rename = rename


def main(student, teacher, out, point, n, resume=None):
    if point != "none":
        arm(point, int(n))
    world = demo.make_world(seed=0)
    rl.train_rl(student, teacher, world.train[:6], BM25Retriever(world.corpus), rl.RLConfig(**CONFIG),
                ddp.Dist(), loop.Run(out, resume=resume))


if __name__ == "__main__":
    main(*sys.argv[1:])
