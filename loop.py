"""What both trainers share: the stage skeleton, the optimizer and its step, stopping, the data order,
metrics, resuming.

What it does: the skeleton every training run has around its own loop — the options a run is given
(`Run`: where it writes, what it resumes, when it stops), the checks before anything loads
(`check_run`), the resumed state (`resumed_state`), and the run itself (`open_stage` → `Stage`: the
output prepared, metrics, the step range, the progress bar, Ctrl-C / SIGTERM, the save cadence and the
last save). AdamW with warm-up and cosine decay (`make_optimizer`) and the step that clips and skips a
non-finite or all-zero gradient on every rank alike (`optimizer_step`); a run that diverged or was
interrupted stops with a message saying how to continue (`stop_if_diverged`, `StopSignals`,
`interrupted`); the data order as a pure function of (seed, position) so resume is exact
(`data_window`); where the metric rows go (`Reporter`: metrics.jsonl, TensorBoard or W&B); and how a
resumed run picks up its optimizer, schedule and metrics (`start_from`).

What it does not do: run a step or compute a loss (sft.py, rl.py, dgpo.py), read or write checkpoints
(checkpoint.py) or build batches (models.py).

    import loop
    run = loop.Run("runs/kd", resume="runs/kd")
    loop.check_run(run, {}, dist)                         # before any model or data is loaded
    optimizer, scheduler = loop.make_optimizer(model, lr=1e-5, weight_decay=0.0, total_steps=100,
                                               warmup_steps=10, min_lr_ratio=0.1)
    stage = loop.open_stage("kd", cfg, run, loop.resumed_state(run, "kd", cfg, dist), optimizer, scheduler, dist)
    with stage as steps:
        for step in steps:
            ...                                           # the trainer's own step: loss, backward, then
            norm = loop.optimizer_step(ddp_model, optimizer, scheduler, 1.0, stage.counters, dist)
            stage.after_step(step, {"step": step + 1, "grad_norm": norm}, save)
    stage.finish(save)
"""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import signal
import sys
import threading
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as torch_dist
from tqdm import tqdm

import checkpoint
import cli
import ddp
import models


# -----------------------------------------------------------------------------
# The stage skeleton: what every training run does before, around and after its own loop


@dataclass
class Run:
    """Where a training stage writes and how it starts and stops: the options every trainer takes alike
    (`train.py teacher / kd / rl` fill them from the command line)."""
    out_dir: str                     # the run's directory: the checkpoint, metrics.jsonl, best/
    resume: str | None = None        # a checkpoint of this stage to continue from
    stop_after: int | None = None    # end this run after N steps, resumable (the schedule still spans cfg.steps)
    override_config: bool = False    # with resume: continue with settings or inputs that differ (recorded)
    overwrite: bool = False          # replace the run directory already at out_dir (only what a run wrote)
    report_to: str = "none"          # also send the metrics to TensorBoard or W&B (REPORT_TO)
    save_dtype: str = "float32"      # dtype of the saved model files (checkpoint.SAVE_DTYPES)
    info: dict | None = None         # train_config.json's record beside the settings: input paths, the command line
    inputs: dict | None = None       # {argument: checkpoint.fingerprint}: recorded, and a resume with others refused

    def __post_init__(self):
        if self.override_config and not self.resume:
            raise ValueError("--override-config only makes sense with --resume")


def check_run(run: Run, reads: dict, dist: ddp.Dist) -> None:
    """Before anything is loaded: a save that a crash interrupted in --resume is finished or rolled
    back (checkpoint.recover_resume), and an --out this run may not write is refused, changing nothing
    (checkpoint.check_output). `reads`: {argument: path} of what the run reads beside run.inputs."""
    checkpoint.recover_resume(run.resume, dist)
    if dist.master:
        paths = {**reads, **{arg: fp["path"] for arg, fp in (run.inputs or {}).items()}, "--resume": run.resume}
        checkpoint.check_output(run.out_dir, run.resume, run.overwrite, inputs=paths)


def resumed_state(run: Run, stage: str, cfg, dist: ddp.Dist) -> dict | None:
    """The trainer state --resume continues, None for a fresh run; refused when it is another stage's,
    or its settings or inputs differ and not run.override_config (checkpoint.load_trainer_state)."""
    if run.resume is None:
        return None
    return checkpoint.load_trainer_state(run.resume, dist, stage, asdict(cfg), run.override_config, run.inputs)


def open_stage(name: str, cfg, run: Run, state: dict | None, optimizer, scheduler, dist: ddp.Dist) -> Stage:
    """After every input is loaded (only now may --overwrite delete anything): run.out_dir prepared,
    the metrics opened, and a resumed run's optimizer, schedule, counters and metrics picked up
    (start_from). The stage spans cfg.steps; this run ends run.stop_after steps after its start."""
    if dist.master:
        checkpoint.prepare_output(run.out_dir, run.resume, run.overwrite)
    if dist.enabled:
        torch_dist.barrier()
    reporter = Reporter(run.out_dir, run.report_to, name, asdict(cfg), dist)
    start_step, counters = 0, {}
    if state is not None:
        start_from(state, optimizer, scheduler, cfg.lr, reporter, dist)
        start_step, counters = state["step"], state["counters"]
    end_step = min(cfg.steps, start_step + run.stop_after) if run.stop_after else cfg.steps
    return Stage(name, run, asdict(cfg), cfg.steps, cfg.save_every, start_step, end_step, counters, reporter, dist)


@dataclass
class Stage:
    """A training run from the moment its inputs are loaded to its last checkpoint. The trainer keeps
    its own loop and hands the end of every step to the stage:

        with stage as steps:                # a progress bar over this run's steps; Ctrl-C / SIGTERM
            for step in steps:              #   only ask the loop to stop after the step
                ...                         # the trainer's step, its metrics in `row`
                stage.after_step(step, row, save)
        stage.finish(save)                  # the last checkpoint, the metrics closed

    `save(step)` is the trainer's: a checkpoint of its model with trainer_state(...) and whatever
    else it needs to continue exactly."""
    name: str
    run: Run
    config: dict                     # the settings, as every checkpoint records them
    steps: int                       # the schedule's length: cfg.steps
    save_every: int                  # a checkpoint every N steps (0: only at the end)
    start_step: int                  # 0, or the resumed checkpoint's step
    end_step: int                    # where this run stops: `steps`, or sooner with run.stop_after
    counters: dict                   # skipped and zero-gradient steps (optimizer_step): in every checkpoint
    reporter: Reporter
    dist: ddp.Dist
    bar: tqdm | None = None
    stop: StopSignals | None = None

    def __enter__(self) -> tqdm:
        self.bar = tqdm(range(self.start_step, self.end_step), desc=self.name, disable=not self.dist.master,
                        initial=self.start_step, total=self.steps, dynamic_ncols=True)
        self.stop = StopSignals().__enter__()
        return self.bar

    def __exit__(self, *exc) -> None:
        self.stop.__exit__(*exc)
        self.bar.close()

    def log(self, row: dict) -> None:
        self.reporter.log(row, self.dist)

    def after_step(self, step: int, row: dict, save, **shown) -> None:
        """After step `step` (counted from 0): `shown` on the progress bar and `row` in the metrics; a run
        whose last steps all failed stops (stop_if_diverged); after Ctrl-C / SIGTERM the step is saved and
        Interrupted raised, naming the command that continues; every save_every steps, a checkpoint."""
        done = step + 1
        if self.dist.master and shown:
            self.bar.set_postfix(**shown)
        self.log(row)
        stop_if_diverged(self.counters, self.run.out_dir)
        if done < self.end_step and self.stop.requested(self.dist):
            self.bar.close()
            save(done)
            self.reporter.close()
            raise interrupted(self.stop.signum, self.name, done, self.steps, self.run.out_dir, self.run.info,
                              self.dist)
        if self.save_every and done % self.save_every == 0 and done < self.end_step:
            save(done)

    def finish(self, save) -> None:
        """The run's last checkpoint (resumable: the stage may go on with --resume), the metrics closed. A
        run cut short by run.stop_after that got Ctrl-C / SIGTERM during its last step raises Interrupted
        after that save, as after any earlier step: whoever would run its next segment must not go on."""
        save(self.end_step)
        self.reporter.close()
        if self.end_step < self.steps and self.stop is not None and self.stop.requested(self.dist):
            raise interrupted(self.stop.signum, self.name, self.end_step, self.steps, self.run.out_dir,
                              self.run.info, self.dist)

    def trainer_state(self, step: int, optimizer, scheduler) -> dict:
        """What every stage's checkpoint records beside the weights (checkpoint.save_checkpoint adds the
        RNG states): enough to continue exactly and to refuse a resume with other settings or inputs."""
        return {"stage": self.name, "step": step, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "counters": self.counters, "config": self.config,
                "inputs": self.run.inputs}


# -----------------------------------------------------------------------------
# Resuming: the optimizer, its schedule and the metrics continue where the checkpoint left them


def restore_optimizer(optimizer, scheduler, optimizer_state: dict, scheduler_state: dict, lr: float,
                      lr_changed: bool) -> None:
    """Loads an optimizer and its schedule; with an overridden lr, the new value really takes effect
    (the schedule's base value, not only the config)."""
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    if lr_changed:
        scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
        for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
            group["initial_lr"] = lr
            group["lr"] = lr * factor(scheduler.last_epoch)


def start_from(state: dict, optimizer, scheduler, lr: float, reporter: Reporter, dist: ddp.Dist) -> None:
    """Restores optimizer and scheduler from a resumed state (an overridden lr applied), drops metric
    lines written after the checkpoint (and a torn last line), records any overridden settings or
    inputs in the metrics, and drops a best/ that does not belong to this state (saved just before
    a crash, by a step the resumed run has not reached: the run saves it again if it gets there)."""
    restore_optimizer(optimizer, scheduler, state["optimizer"], state["scheduler"], lr, "lr" in state["changed"])
    if state.get("save_dtype", "float32") != "float32":
        warnings.warn(f"resuming from weights saved as {state['save_dtype']}: the run continues from rounded "
                      "weights and will not be bit-identical to an uninterrupted one")
    if dist.master:
        checkpoint.truncate_metrics(reporter.path, state["step"])
        best_dir = os.path.join(os.path.dirname(reporter.path), "best")
        best_state = os.path.join(best_dir, checkpoint.STATE_FILE)
        if "best" in state and os.path.isfile(best_state) and \
                torch.load(best_state, map_location="cpu", weights_only=False)["step"] != state["best"]["step"]:
            warnings.warn(f"{best_dir} is not the best checkpoint this state records (a crash came between "
                          "its save and the run's); it is removed, and the next validation that improves on "
                          f"{state['best']['em']} saves it again")
            shutil.rmtree(best_dir)
    if state["changed"]:
        reporter.log({"step": state["step"], "config_override": {k: list(v) for k, v in state["changed"].items()}},
                     dist)
    if state["changed_inputs"]:
        reporter.log({"step": state["step"],
                      "input_override": {k: list(v) for k, v in state["changed_inputs"].items()}}, dist)


# -----------------------------------------------------------------------------
# Metrics: every row to metrics.jsonl, and optionally TensorBoard or W&B


def append_metrics(path: str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


REPORT_TO = ("none", "tensorboard", "wandb")


class Reporter:
    """Where a stage's metric rows go: always DIR/metrics.jsonl, plus TensorBoard (DIR/tensorboard)
    or Weights & Biases with --report-to; their packages are imported only when asked for. Rank 0
    only (the rows are already reduced over ranks)."""

    def __init__(self, out_dir: str, kind: str, stage: str, config: dict, dist: ddp.Dist):
        if kind not in REPORT_TO:
            raise ValueError(f"--report-to {kind!r}: must be one of {REPORT_TO}")
        self.path, self.stage, self.writer, self.wandb = os.path.join(out_dir, "metrics.jsonl"), stage, None, None
        if not dist.master or kind == "none":
            return
        if kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ImportError("--report-to tensorboard needs the optional package 'tensorboard' "
                                  "(pip install tensorboard)") from None
            self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))
        else:
            try:
                import wandb
            except ImportError:
                raise ImportError("--report-to wandb needs the optional package 'wandb' (pip install wandb)") from None
            self.wandb = wandb.init(project="dgpo", name=f"{stage}:{os.path.basename(out_dir)}", dir=out_dir,
                                    config=config)

    def log(self, row: dict, dist: ddp.Dist) -> None:
        if not dist.master:
            return
        append_metrics(self.path, row)
        numbers = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))
                   and not isinstance(v, bool)}
        if self.writer is not None:
            for k, v in numbers.items():
                self.writer.add_scalar(f"{self.stage}/{k}", v, row["step"])
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(numbers, step=row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


# -----------------------------------------------------------------------------
# The optimizer and its step


def make_optimizer(model, lr: float, weight_decay: float, total_steps: int, warmup_steps: int,
                   min_lr_ratio: float | None):
    """AdamW with linear warmup, then cosine decay to lr·min_lr_ratio (or constant if None)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=weight_decay, betas=(0.9, 0.95))

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if min_lr_ratio is None:
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def optimizer_step(model, optimizer, scheduler, grad_clip: float, counters: dict, dist: ddp.Dist,
                   finite_loss: bool = True) -> float:
    """Clips, then steps — with two exceptions, both decided on every rank alike (one all-reduce):
    - some rank's loss or the gradient is not finite: the step is skipped, counted (skipped_steps)
      and warned about;
    - the gradient is exactly zero (every GRPO group constant and no other term, say): the step is
      skipped and counted (zero_grad_steps), since AdamW would otherwise still move every weight,
      replaying its momentum (0.64, 0.50, 0.41 … × lr on the following empty steps with betas
      (0.9, 0.95)) and decaying it; the optimizer's state (moments, step count) is left as it is.
    The learning-rate schedule advances on every step, skipped or not: it follows the step count.
    A step that leaves a weight non-finite (finite gradients times a learning rate like 1e30) stops
    the run: it cannot be undone, and the next forward would sample garbage."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip).item()
    bad, moved = ddp.all_reduce_sum(dist, [0.0 if finite_loss else 1.0, 1.0 if norm != 0.0 else 0.0])
    if math.isfinite(norm) and not bad and moved:
        optimizer.step()
        counters["consecutive_skipped"] = 0
        check_weights_finite(model, optimizer)
    elif math.isfinite(norm) and not bad:         # a zero gradient on every rank: nothing to learn from
        counters["zero_grad_steps"] = counters.get("zero_grad_steps", 0) + 1
        counters["consecutive_skipped"] = 0
    else:
        counters["skipped_steps"] = counters.get("skipped_steps", 0) + 1
        counters["consecutive_skipped"] = counters.get("consecutive_skipped", 0) + 1
        warnings.warn(f"non-finite loss or gradient norm ({norm}): step skipped "
                      f"({counters['skipped_steps']} so far)")
    optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():      # the schedule follows the step count, skipped steps included;
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
        scheduler.step()                 # torch warns when the very first step was the skipped one
    return norm


def check_weights_finite(model, optimizer) -> None:
    """Raises Stopped naming the first weight an update made NaN or inf (one device sync for all)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if torch.stack([torch.isfinite(p).all() for p in params]).all():
        return
    bad = checkpoint.first_non_finite(models.hf_model(model))
    lr = optimizer.param_groups[0]["lr"]
    raise cli.Stopped(f"the update at learning rate {lr:g} made weight {bad} NaN or inf (the learning rate is far too "
                      "large?); stopping without saving: the last checkpoint saved, if any, is unchanged")


MAX_CONSECUTIVE_SKIPPED = 10   # then the run stops: the model (or the data) is broken, not unlucky


def stop_if_diverged(counters: dict, out_dir: str) -> None:
    """Stops a run whose last MAX_CONSECUTIVE_SKIPPED steps all had a non-finite loss or gradient,
    without saving: the last checkpoint in out_dir (if any) stays the result."""
    if counters.get("consecutive_skipped", 0) >= MAX_CONSECUTIVE_SKIPPED:
        raise cli.Stopped(f"{counters['consecutive_skipped']} consecutive steps had a non-finite loss or "
                          f"gradient and were skipped; stopping without saving (the last checkpoint, if any, "
                          f"is in {out_dir})")


# -----------------------------------------------------------------------------
# Interrupts: Ctrl-C or SIGTERM finishes the step, saves, and says how to continue


class StopSignals:
    """While active, the first SIGINT or SIGTERM only sets `.signum`: the training loop finishes its
    step, saves and raises Interrupted. A second one stops at once (the step in flight is lost, the
    last checkpoint is intact). Handlers can only be installed from the main thread; elsewhere (a
    notebook's worker thread) signals act as usual."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum, self.previous = None, {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:                    # the second one: stop now
            signal.signal(signum, self.previous.get(signum, signal.SIG_DFL))
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a resumable checkpoint "
              "(send it again to stop at once, losing the step)", file=sys.stderr, flush=True)

    def requested(self, dist: ddp.Dist) -> int | None:
        """The signal any rank received (all ranks agree, so all stop after the same step)."""
        got = ddp.all_reduce_sum(dist, [float(self.signum or 0)])[0] if dist.enabled else float(self.signum or 0)
        if got and self.signum is None:      # another rank got it; name the usual one
            self.signum = signal.SIGTERM
        return self.signum if got else None


def resume_command(info: dict | None, out_dir: str, dist: ddp.Dist) -> str:
    """The command that continues a run from out_dir: the run's own command line (info["argv"]) without
    --overwrite and any earlier --resume, plus --resume out_dir; under torchrun, as a torchrun command."""
    argv = list((info or {}).get("argv") or [])
    if not argv:
        return f"resume=\"{out_dir}\" (the Python API)"
    kept, skip = [], False
    for arg in argv[1:]:
        if skip:
            skip = False
        elif arg == "--resume":
            skip = True
        elif arg != "--overwrite" and not arg.startswith("--resume="):
            kept.append(arg)
    launcher = [f"torchrun --nproc_per_node={dist.world_size}"] if dist.enabled else [sys.executable]
    return " ".join(launcher + [shlex.quote(a) for a in [argv[0], *kept, "--resume", out_dir]])


def interrupted(signum: int, stage: str, step: int, steps: int, out_dir: str, info: dict | None,
                dist: ddp.Dist) -> cli.Interrupted:
    """The exception a stage raises after saving on SIGINT / SIGTERM: what happened, where the
    checkpoint is, and the exact command that continues the run."""
    return cli.Interrupted(f"{signal.Signals(signum).name}: {stage} stopped after step {step} of {steps} and saved a "
                           f"resumable checkpoint in {out_dir}; continue with: {resume_command(info, out_dir, dist)}",
                           signum)


# -----------------------------------------------------------------------------
# The data order: a pure function of (seed, position), so resume is exact


def data_window(seed: int, n: int, start: int, size: int) -> list[int]:
    """Items start .. start+size of an endless stream of epochs, each a permutation of range(n) that
    depends on (seed, epoch) only — so the data position is just a number, and resume is exact."""
    perms, out = {}, []
    for position in range(start, start + size):
        epoch, offset = divmod(position, n)
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        out.append(int(perms[epoch][offset]))
    return out


def length_bucketed_window(seed: int, lengths: list[int], step: int, batch_size: int, bucket_steps: int) -> list[int]:
    """The sequences of optimizer step `step` when batches are bucketed by length: the data_window of
    `bucket_steps` consecutive steps (bucket_steps × batch_size items of the same endless stream) is
    sorted by length and cut into bucket_steps batches of neighbouring lengths, which are taken in an
    order drawn from (seed, window). Each window holds exactly the sequences it would hold unbucketed,
    so every sequence is still seen once an epoch; a batch pads only to its own similar lengths.
    bucket_steps 1 is data_window itself. Still a pure function of (seed, step): resume is exact."""
    if bucket_steps <= 1:
        return data_window(seed, len(lengths), step * batch_size, batch_size)
    window, offset = divmod(step, bucket_steps)
    items = data_window(seed, len(lengths), window * bucket_steps * batch_size, bucket_steps * batch_size)
    items = sorted(items, key=lambda i: lengths[i])          # stable: equal lengths keep the stream's order
    order = np.random.default_rng([seed, window, 1]).permutation(bucket_steps)
    start = int(order[offset]) * batch_size
    return items[start:start + batch_size]
