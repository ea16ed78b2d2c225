"""Benchmark: rollout() against a Search-R1-style loop and against plain KV-cache decoding, in one process.

Same model, same batch (--questions demo test questions), greedy (or with --temperature T sampled, as
RL does: then the rollout and the raw loops sample with the rollout's sampler, search-r1 and decode
stay greedy), BM25 on the demo corpus:
  rollout    rollout.rollout(): stops in token space, keeps each row's KV cache across turns, so an
             observation costs a forward over its own tokens; rows that end a turn leave the batch.
  search-r1  the public code's loop, written here: each turn left-pads every active row's whole context
             and calls model.generate to the per-turn budget (a row stops early only at eos), decodes,
             cuts at the first </search> or </answer>, re-tokenises the kept text, appends the
             observation; the next turn prefills the whole context again.
  decode     the speed limit: one model.generate over the prompts, no search, each row producing the
             same number of new tokens as rollout kept per row on average (min = max new tokens).
  raw loop   a stricter limit, for reference: a bare forward + argmax loop over a DynamicCache.
  ragged raw loop  the same loop, but each row decodes exactly as many tokens as it sampled in the
             rollout and then leaves the batch: the decode limit of the rollout's written tokens. When a
             few rows write long turns (a model that rambles to the budget) they are a long sequential
             chain in any decoder, and "decode" above, which spreads the same total evenly, flatters
             the limit; this one does not. It skips the observations, which the rollout must read.
  ragged replay  the decode limit of the rollout's whole workload: the same rows' recorded tokens fed
             turn by turn as rollout() feeds them (each turn one forward over the pending prompt or
             observation, then one per written token, rows leaving when their turn is done, the same
             per-row key/value carry), the sampler run on every step; no stop detection (it knows
             each turn's length), text, retrieval or tokenising, and no forward for a dropped eos: a
             lower bound. Greedy, every step's argmax is checked against the recorded token.
"Tokens kept" = model-written tokens that end up in the trajectories (for the decodes: all new tokens);
the figure compared is tokens kept per second of wall time, retrieval included where there is any.
Each round runs every method once, in turn; the tables give medians over --repeats rounds, so load
from other work on the machine falls on all methods alike. Then a split of the rollout's and the
ragged raw loop's wall time: prefill forwards (prompts, observations, nudges), decode forwards,
retrieval, and the rest (Python, tokenisation, sampling, cache bookkeeping).

Cases: a random student-size model (never writes a tag, so every turn runs to the budget and the
Search-R1 loop wastes nothing past the tags — only its re-prefills), and with --warmup-steps N the
same model after N steps of cross-entropy on oracle trajectories (it then writes <search>/<answer>
and rows end their turns at different times). --model DIR benchmarks a saved checkpoint instead.

    flock /tmp/dgpo-cpu.lock .venv/bin/python bench/bench_rollout.py
    flock /tmp/dgpo-cpu.lock .venv/bin/python bench/bench_rollout.py --warmup-steps 300
    flock /tmp/dgpo-cpu.lock .venv/bin/python bench/bench_rollout.py --model runs/demo/kd
    flock /tmp/dgpo-cpu.lock .venv/bin/python bench/bench_rollout.py --model runs/demo/kd --temperature 1 \
        --methods "ragged raw loop" --repeats 5
"""
import argparse
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import demo  # noqa: E402
import models  # noqa: E402
from retriever import BM25Retriever  # noqa: E402
from rollout import (INVALID_ACTION, RolloutConfig, _left_pad_pending, _row_kv, _sample, _stack_kv,  # noqa: E402
                     encode_text, last_query, observation_ids, prompt_ids, rollout)


# -----------------------------------------------------------------------------
# The baselines

def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])                  # (B, T)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])           # (B, T)
    return ids, mask


@torch.no_grad()
def search_r1_loop(model, tokenizer, questions, retriever, config: RolloutConfig) -> dict:
    """Search-R1's generation loop (text-space stop, re-prefill each turn). Returns the kept-token count
    and what the rows did, for comparison with rollout()."""
    eos = tokenizer.eos_token_id
    contexts = [prompt_ids(tokenizer, q) for q in questions]
    active, kept, searches, answered, generated = list(range(len(questions))), 0, 0, 0, 0
    for turn in range(config.max_turns + 1):
        if not active:
            break
        ids, mask = _left_pad([contexts[i] for i in active], tokenizer.pad_token_id)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=config.max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)[:, ids.shape[1]:]
        generated += out.numel()
        searching, queries, nudged = [], [], []
        for i, new in zip(active, out.tolist()):
            hit_eos = eos in new
            text = tokenizer.decode(new[:new.index(eos)] if hit_eos else new, skip_special_tokens=True)
            # cut after the first stop tag (Search-R1 itself looks for </search> first, so an answer
            # followed by a search in the over-generated text is cut at the search: a bug not copied)
            cut_at = min((tag for tag in ("</search>", "</answer>") if tag in text), key=text.find, default=None)
            if cut_at:
                text = text.split(cut_at)[0] + cut_at
            response = encode_text(tokenizer, text) + ([eos] if hit_eos and not cut_at else [])
            contexts[i] += response                      # re-tokenised: not necessarily the sampled ids
            kept += len(response)
            query = last_query(text) if cut_at == "</search>" else None
            if cut_at == "</answer>" or (hit_eos and not cut_at) or turn == config.max_turns:
                answered += cut_at == "</answer>"
            elif query is not None:
                searching.append(i)
                queries.append(query)
            else:
                contexts[i] += encode_text(tokenizer, INVALID_ACTION)
                nudged.append(i)
        for i, hits in zip(searching, retriever.search(queries, topk=config.topk) if queries else []):
            contexts[i] += observation_ids(tokenizer, hits, config.max_obs_tokens)[0]
        searches += len(searching)
        active = sorted(searching + nudged)
    return {"kept": kept, "generated": generated, "searches": searches, "answered": answered}


@torch.no_grad()
def generate_decode(model, tokenizer, questions, new_tokens: int) -> int:
    ids, mask = _left_pad([prompt_ids(tokenizer, q) for q in questions], tokenizer.pad_token_id)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[:, ids.shape[1]:].numel()


def raw_decode(model, tokenizer, questions, new_tokens: int, config: RolloutConfig | None = None) -> int:
    """The least work a KV-cache decode can do: one batched forward per token, argmax (or the
    rollout's sampler), nothing else."""
    return ragged_decode(model, tokenizer, questions, [new_tokens] * len(questions), config)


@torch.no_grad()
def ragged_decode(model, tokenizer, questions, new_tokens: list[int], config: RolloutConfig | None = None) -> int:
    """The decode limit for the rollout's own workload: row i decodes exactly new_tokens[i] tokens (what
    it sampled in the whole rollout, no search) and leaves the batch when done, as rollout rows do. A
    row that wrote long turns is then as long a sequential chain here as in the rollout. Tokens are
    the argmax, or with a sampling `config` drawn by the rollout's own sampler (torch.multinomial
    costs more than argmax: ~2 ms a step for 64 rows of 2,048 ids here), so a sampled rollout is
    compared with a decoder that samples."""
    sampling = config is not None and not config.greedy and config.temperature > 0
    generator = torch.Generator().manual_seed(config.seed or 0) if sampling else None
    ids, mask = _left_pad([prompt_ids(tokenizer, q) for q in questions], tokenizer.pad_token_id)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    left = torch.tensor(new_tokens)                                                      # (B,)
    cache = DynamicCache()
    while len(left):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]
        if sampling:
            ids = _sample(logits[:, :len(tokenizer)].float(), config, generator).unsqueeze(1)  # (R, 1)
        else:
            ids = logits.argmax(dim=-1, keepdim=True)                                    # (R, 1)
        mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
        positions = positions[:, -1:] + 1
        left = left - 1
        if (left == 0).any():                                                            # finished rows leave
            keep = (left > 0).nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            ids, mask, positions, left = ids[keep], mask[keep], positions[keep], left[keep]
    return sum(new_tokens)


def turn_segments(traj) -> tuple[list[int], list[tuple[list[int], list[int]]]]:
    """A trajectory's tokens as the rollout fed them: the forced start (prompt and any prefix), then per
    turn (the tokens the model wrote, the forced tokens after them: an observation, a nudge, or none).
    Read off the loss mask (1 = written). A turn that ended in a dropped eos keeps its written tokens
    but not the eos (and a turn that wrote only the eos joins its forced tokens to the previous turn's):
    the replay then runs one forward fewer for it than the rollout, which spent one sampling the eos."""
    ids, mask = traj.input_ids, traj.loss_mask
    first = next((i for i, m in enumerate(mask) if m), len(ids))
    turns, i = [], first
    while i < len(ids):
        j = i
        while j < len(ids) and mask[j]:
            j += 1
        k = j
        while k < len(ids) and not mask[k]:
            k += 1
        turns.append((ids[i:j], ids[j:k]))
        i = k
    return ids[:first], turns


@torch.no_grad()
def ragged_replay(model, tokenizer, trajectories, config: RolloutConfig | None = None,
                  differed_out: list | None = None) -> int:
    """The decode limit of the rollout's whole workload, observations included: the rows' recorded
    tokens fed turn by turn as rollout() feeds them — one forward per turn over each playing row's
    pending tokens (its prompt, or its last written token and the observation or nudge after it), then
    one forward per written token, a row leaving the batch when its turn's tokens are done — with the
    rollout's own per-row key/value carry between turns, and the sampler run on every step's logits (its
    cost counted, its draw discarded: the recorded token is fed). No text, retrieval or tokenising, and
    no stop detection (it knows each turn's length, which any real decoder must find out), and one
    forward fewer per eos-ended turn (turn_segments): a lower bound for decoding these rows.
    Greedy, it checks itself: the argmax of every step must be the recorded token (the count that was not
    goes to `differed_out`), i.e. the replay computed what the rollout computed."""
    sampling = config is not None and not config.greedy and config.temperature > 0
    generator = torch.Generator().manual_seed(config.seed or 0) if sampling else None
    rows = []
    for traj in trajectories:
        start, turns = turn_segments(traj)
        rows.append(SimpleNamespace(ids=list(start), n_cached=0, kv=None, turns=turns))
    fed, differed = 0, 0
    for turn in range(max(len(r.turns) for r in rows)):
        playing = [r for r in rows if turn < len(r.turns) and r.turns[turn][0]]
        if not playing:
            continue
        chunk, chunk_mask, positions = _left_pad_pending(playing, "cpu")                # (R, Lp)
        room = chunk.shape[1] + max(len(r.turns[turn][0]) for r in playing)
        cache, cache_mask = _stack_kv(playing, "cpu", room)                               # (R, Lc)
        attention = torch.cat([cache_mask, chunk_mask], dim=1)
        running, step = list(playing), 0
        while running:
            logits = model(input_ids=chunk, attention_mask=attention, position_ids=positions, past_key_values=cache,
                           use_cache=True, logits_to_keep=1).logits[:, -1]                # (R, V)
            if sampling:
                _sample(logits[:, :len(tokenizer)].float(), config, generator)
                predicted = None
            else:
                predicted = logits[:, :len(tokenizer)].argmax(dim=-1).tolist()
            tokens, keep = [], []
            for b, r in enumerate(running):
                written = r.turns[turn][0]
                tokens.append(written[step])
                if predicted is not None and predicted[b] != written[step]:
                    differed += 1
                if step + 1 == len(written):                  # its turn is done: the last token stays pending
                    r.kv, r.n_cached = _row_kv(cache, b, attention[b]), len(r.ids) + len(written) - 1
                    r.ids += written + r.turns[turn][1]
                else:
                    keep.append(b)
            fed += len(tokens)
            step += 1
            if len(keep) < len(running):
                index = torch.tensor(keep, dtype=torch.long)
                cache.batch_select_indices(index)
                attention, positions = attention[index], positions[index]
                tokens, running = [tokens[b] for b in keep], [running[b] for b in keep]
            if not running:
                break
            chunk = torch.tensor(tokens).unsqueeze(1)                                      # (R, 1)
            attention = torch.cat([attention, torch.ones_like(chunk, dtype=torch.bool)], dim=1)
            positions = positions[:, -1:] + 1
    if differed_out is not None:
        differed_out.append(differed)
    return fed


# -----------------------------------------------------------------------------
# A model that writes tags: a few hundred steps of cross-entropy on the oracle's trajectories

def warm_up(model, tokenizer, world, retriever, steps: int, batch_size: int = 8, lr: float = 4e-3, seed: int = 0):
    """Plain SFT (loss on the oracle's own tokens) — enough for the protocol's format, not for answers."""
    trajs = demo.oracle_rollout([q["question"] for q in world.train], retriever, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = random.Random(seed)
    model.train()
    for step in range(steps):
        batch = models.make_batch([asdict(t) for t in rng.sample(trajs, batch_size)], "cpu")
        logits = models.logits_of(model, batch)                                           # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits[batch.mask], batch.targets[batch.mask])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 100 == 0:
            print(f"  warm-up step {step + 1}: loss {loss.item():.3f}", flush=True)
    model.eval()
    return model


# -----------------------------------------------------------------------------

def timed(fn):
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


class TimeSplit:
    """Where a run's wall time goes: model forwards that feed several tokens a row (prefills: prompts,
    observations, nudges), forwards that feed one (decode steps), retrieval calls, and the rest
    (Python, tokenisation, cache bookkeeping). Hooks on the model and a wrapper around the
    retriever's search; split.measure(fn) runs fn and adds to the totals; close() removes them."""

    def __init__(self, model, retriever):
        self.model, self.retriever, self.active = model, retriever, False
        self.seconds = {"prefill": 0.0, "decode": 0.0, "retrieval": 0.0, "total": 0.0}
        self.forwards = {"prefill": 0, "decode": 0}
        self._started = None
        self._hooks = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                       model.register_forward_hook(self._after, with_kwargs=True)]
        search = retriever.search

        def timed_search(*args, **kwargs):
            started = time.perf_counter()
            try:
                return search(*args, **kwargs)
            finally:
                if self.active:
                    self.seconds["retrieval"] += time.perf_counter() - started
        retriever.search = timed_search

    def close(self):
        """Removes the hooks and the wrapper."""
        for hook in self._hooks:
            hook.remove()
        del self.retriever.search          # the instance attribute: the class's method shows again

    def _before(self, module, args, kwargs):
        self._started = time.perf_counter()

    def _after(self, module, args, kwargs, output):
        if self.active:
            kind = "prefill" if kwargs["input_ids"].shape[1] > 1 else "decode"
            self.seconds[kind] += time.perf_counter() - self._started
            self.forwards[kind] += 1

    def measure(self, fn):
        self.active = True
        try:
            result, seconds = timed(fn)
        finally:
            self.active = False
        self.seconds["total"] += seconds
        return result

    def row(self, name: str, runs: int) -> str:
        s = {k: v / runs for k, v in self.seconds.items()}
        rest = s["total"] - s["prefill"] - s["decode"] - s["retrieval"]
        return (f"| {name} | {s['total']:.2f} | {s['prefill']:.2f} ({self.forwards['prefill'] // runs}) | "
                f"{s['decode']:.2f} ({self.forwards['decode'] // runs}) | {s['retrieval']:.3f} | {rest:.2f} |")


def kept_by(trajectories) -> int:
    return sum(sum(t.loss_mask) for t in trajectories)


def bench_case(name, model, tokenizer, questions, retriever, config, repeats: int, methods: list[str],
               max_row_tokens: int | None = None) -> None:
    """Each round runs every method once, in turn (rollout first); reported: the median seconds over
    the rounds and, per method, the median over the rounds of the ratio of rollout's tokens kept per
    second to its. Then where the rollout's and the ragged decode's time goes (one more run each)."""
    rollout(model, tokenizer, questions[:4], retriever, RolloutConfig(max_turns=1, max_new_tokens=8, greedy=True))
    if max_row_tokens is not None:  # a diagnostic: leave out the rows that sample more than this
        lengths = [sum(t.loss_mask) for t in rollout(model, tokenizer, questions, retriever, config)]
        dropped = [i for i, n in enumerate(lengths) if n > max_row_tokens]
        questions = [q for i, q in enumerate(questions) if i not in dropped]
        name += f", without the {len(dropped)} rows that sample more than {max_row_tokens} tokens ({[lengths[i] for i in dropped]})"
    sampling = "greedy" if config.greedy or config.temperature == 0 else f"temperature {config.temperature}, seed {config.seed}"
    print(f"\n## {name}: {len(questions)} questions, max_turns {config.max_turns}, "
          f"{config.max_new_tokens} new tokens per turn, {sampling}", flush=True)
    trajs = rollout(model, tokenizer, questions, retriever, config)
    kept = kept_by(trajs)
    per_row = max(1, round(kept / len(questions)))
    per_traj = [max(1, sum(t.loss_mask)) for t in trajs]
    runs = {"rollout": lambda: kept_by(rollout(model, tokenizer, questions, retriever, config)),
            "search-r1": lambda: search_r1_loop(model, tokenizer, questions, retriever, config),
            "decode": lambda: generate_decode(model, tokenizer, questions, per_row),
            "raw loop": lambda: raw_decode(model, tokenizer, questions, per_row, config),
            "ragged raw loop": lambda: ragged_decode(model, tokenizer, questions, per_traj, config),
            "ragged replay": lambda: ragged_replay(model, tokenizer, trajs, config)}
    runs = {k: v for k, v in runs.items() if k == "rollout" or k in methods}
    seconds, tokens, baseline = {k: [] for k in runs}, {}, None
    for _ in range(repeats):
        for method, fn in runs.items():
            result, took = timed(fn)
            seconds[method].append(took)
            if method == "search-r1":
                baseline, result = result, result["kept"]
            if method == "rollout" and result != kept:
                raise RuntimeError(f"rollout kept {result} tokens, {kept} in its first run: not deterministic")
            tokens[method] = result
    turns = [len(t.turns) for t in trajs]
    print(f"rollout rows: searches {sum(t.num_searches for t in trajs)}, answered {sum(t.answered for t in trajs)}, "
          f"invalid {sum(t.num_invalid for t in trajs)}, turns per row {min(turns)}-{max(turns)}, sampled tokens "
          f"per turn {kept / sum(turns):.1f}, per row {min(per_traj)}-{max(per_traj)}" + (
              "" if baseline is None else f"; search-r1 loop: searches {baseline['searches']}, answered "
              f"{baseline['answered']}, generated {baseline['generated']} for {baseline['kept']} kept"))
    print(f"\nmedians of {repeats} interleaved rounds")
    print("| method | tokens kept | seconds | tokens kept/s | rollout / this |")
    print("|---|---|---|---|---|")
    for method in runs:
        ratio = statistics.median((tokens["rollout"] / r) / (tokens[method] / m)
                                  for r, m in zip(seconds["rollout"], seconds[method]))
        median = statistics.median(seconds[method])
        print(f"| {method} | {tokens[method]} | {median:.2f} | {tokens[method] / median:.0f} | {ratio:.2f}x |")
    split = TimeSplit(model, retriever)
    for _ in range(repeats):
        split.measure(lambda: rollout(model, tokenizer, questions, retriever, config))
    print("\nwhere the time goes, seconds per run (forwards in parentheses), mean of", repeats, "more runs each")
    print("| run | total | prefill forwards | decode forwards | retrieval | the rest |")
    print("|---|---:|---:|---:|---:|---:|")
    print(split.row("rollout", repeats))
    split.seconds, split.forwards = {k: 0.0 for k in split.seconds}, {k: 0 for k in split.forwards}
    for _ in range(repeats):
        split.measure(lambda: ragged_decode(model, tokenizer, questions, per_traj, config))
    print(split.row("ragged raw loop", repeats))
    split.seconds, split.forwards = {k: 0.0 for k in split.seconds}, {k: 0 for k in split.forwards}
    for _ in range(repeats):
        split.measure(lambda: ragged_replay(model, tokenizer, trajs, config))
    print(split.row("ragged replay", repeats))
    split.close()
    if config.greedy or config.temperature == 0:
        differed = []
        ragged_replay(model, tokenizer, trajs, config, differed)
        print(f"\nthe replay's argmax differed from the rollout's token at {differed[0]} of {kept} steps")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a saved HF model directory (with its tokenizer); default: random demo model")
    parser.add_argument("--size", default="student", choices=sorted(demo.MODEL_SIZES))
    parser.add_argument("--warmup-steps", type=int, default=0, help="also bench after N SFT steps on oracle data")
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--max-turns", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--methods", nargs="+", default=["search-r1", "decode", "raw loop", "ragged raw loop",
                                                         "ragged replay"],
                        help="baselines to run besides the rollout (search-r1 is the slow one)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; else sampled with --seed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-row-tokens", type=int, help="a diagnostic: leave out the questions whose rows "
                                                           "sample more than this many tokens")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads:
        torch.set_num_threads(args.threads)

    world = demo.make_world(seed=0)
    retriever = BM25Retriever(world.corpus)
    questions = [q["question"] for q in world.test[:args.questions]]
    config = RolloutConfig(max_turns=args.max_turns, max_new_tokens=args.max_new_tokens, greedy=args.temperature == 0,
                           temperature=args.temperature or 1.0, seed=args.seed)
    print(f"# bench_rollout: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        bench_case(f"model {args.model}", model, tokenizer, questions, retriever, config, args.repeats, args.methods,
                   args.max_row_tokens)
        return
    tokenizer = demo.train_tokenizer(world)
    positions = 2 * (args.max_turns + 1) * (args.max_new_tokens + 600)
    model = demo.make_tiny_model(tokenizer, size=args.size, seed=0, max_positions=positions).eval()
    bench_case(f"random {args.size} model", model, tokenizer, questions, retriever, config, args.repeats, args.methods,
               args.max_row_tokens)
    if args.warmup_steps:
        print(f"\nwarming up the {args.size} model: {args.warmup_steps} steps on oracle trajectories", flush=True)
        _, seconds = timed(lambda: warm_up(model, tokenizer, world, retriever, args.warmup_steps))
        print(f"  ({seconds:.0f} s)")
        bench_case(f"{args.size} model after {args.warmup_steps} SFT steps", model, tokenizer, questions,
                   retriever, config, args.repeats, args.methods, args.max_row_tokens)


if __name__ == "__main__":
    main()
