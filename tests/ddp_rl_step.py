"""One DGPO optimizer step on fixed rollouts, run by tests/test_rl.py under torchrun (gloo, CPU)
or as a single process. Each rank takes a contiguous share of whole groups; the parameters after the
step are saved per rank so the test can compare ranks with each other and with one process.

    python -m torch.distributed.run --nproc_per_node=2 tests/ddp_rl_step.py STUDENT TEACHER RECORDS OUT \
        [TEACHER_AS [MINI_BATCHES [ALGO [DROP]]]]

Every instrument is on (per-term gradient norms, an entropy bonus for the entropy term); DROP=1 turns
on --drop-constant-groups with 2 prompts a step, so the ranks hold unequal shares of the update.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

import data  # noqa: E402
import ddp  # noqa: E402
import models  # noqa: E402
import rl  # noqa: E402


def main(student_dir, teacher_dir, records_path, out_dir, teacher_as="loss", mini_batches="1", algo="grpo",
         drop="0"):
    dist = ddp.setup()
    cfg = rl.RLConfig(micro_batch_size=3, beta=0.5, warmup_ratio=0.0, teacher_as=teacher_as,
                      mini_batches=int(mini_batches), algo=algo, entropy_coef=0.01, term_grad_norms=True,
                      drop_constant_groups=drop == "1", prompts_per_step=2 if drop == "1" else 512)
    model = models.load_model(student_dir, dist, trainable=True)
    teacher = models.load_model(teacher_dir, dist, trainable=False)
    tokenizer = models.load_tokenizer(student_dir)
    vocab_size = models.vocab_size_of(tokenizer, model, teacher)
    ddp_model = models.wrap(model, dist)
    # plain SGD: the update is the gradient itself, so the comparison checks DDP's gradients directly
    # (Adam's first step is ±lr wherever |g| >> eps, and flips on gradients near 0 — noise, not signal)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    records = data.load_trajectories(records_path)
    groups = sorted({r["group"] for r in records})
    share = len(groups) // dist.world_size
    mine = set(groups[dist.rank * share:(dist.rank + 1) * share])
    local = [r for r in records if r["group"] in mine]
    critic, critic_params = None, {}
    if algo == "ppo":
        critic_hf = rl.load_critic(student_dir, dist, False, "--student", fresh=True)
        critic_optimizer = torch.optim.SGD(critic_hf.parameters(), lr=1.0)
        critic = rl.Critic(models.wrap(critic_hf, dist), critic_optimizer,
                           torch.optim.lr_scheduler.LambdaLR(critic_optimizer, lambda step: 1.0))
    metrics = rl.rl_update(ddp_model, teacher, optimizer, scheduler, local, cfg, dist, vocab_size, {}, critic)
    if critic is not None:
        critic_params = models.hf_model(critic.model).state_dict()
    torch.save({"params": model.state_dict(), "critic": critic_params, "metrics": metrics},
               os.path.join(out_dir, f"rank{dist.rank}_of{dist.world_size}.pt"))
    if dist.enabled:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
