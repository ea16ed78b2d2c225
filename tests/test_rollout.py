"""Tests for rollout.py: token fidelity, masks, the turn logic, determinism, and what the cache costs.

Two kinds of model drive the rollout here:
- `ScriptedLM`, a stand-in with the Hugging Face call signature whose next token comes from a script
  (one list of token ids per turn, per question). It keeps the ids it is fed as an extra layer of
  the KV cache, so — like a real LM — it knows nothing but what rollout() gave it through the
  cache, the attention mask and the position ids, and it checks them at every call.
- A real random Qwen2 (2 layers, hidden 32). Inside `ScriptedLM(inner=model)` the real model runs on
  every call and the script only adds a large bias where it names a token (`FREE` = the model's own
  argmax), so the rows search, read and answer on cue while the real KV path does all the work.
The retriever is a scripted fake where the passages must be known, BM25 on the demo world elsewhere.
"""
import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.cache_utils import Cache

import demo
import retriever as retriever_module
import rollout as rollout_module
from rollout import (INVALID_ACTION, OBS_CLOSE, OBS_OPEN, PROMPT_TEMPLATE, RolloutConfig, _sample, encode_text,
                     format_passages, format_question, observation_ids, prompt_ids, rollout)

FREE = None   # a script position where the model picks its own token


# -----------------------------------------------------------------------------
# Stand-ins: a scripted model, a scripted retriever, and a random Qwen2 that does not just echo

class ScriptedLM(torch.nn.Module):
    """Emits scripted token ids, seeing its context only through the inputs rollout() gives it.

    `scripts[question]` is a list of turns, each a list of token ids or FREE. The model finds its
    place from its context: the turn index is the number of forced segments (observations and
    nudges, recognised by how they end) since the prompt, the step is the number of tokens since the
    last one. Past the end of a turn's script it emits FREE. FREE is the inner model's argmax, or
    `filler` without one. Every call checks that the new tokens' position ids count the real tokens
    before them, and records what each row saw (`seen`), how many real tokens it was fed (`fed`) and
    whether it ran in training mode (`modes`).
    """

    def __init__(self, tokenizer, scripts: dict[str, list[list]], inner=None):
        super().__init__()
        self.inner = inner
        self.vocab_size = len(tokenizer)
        self.scripts = {tuple(prompt_ids(tokenizer, q)): turns for q, turns in scripts.items()}
        self.segment_ends = [encode_text(tokenizer, "</information>\n\n"),     # how forced segments end
                             encode_text(tokenizer, INVALID_ACTION)]
        self.filler = encode_text(tokenizer, " x")[0]
        self.id_layer = inner.config.num_hidden_layers if inner is not None else 0
        self.anchor = torch.nn.Parameter(torch.zeros(()))   # rollout() reads the device off parameters()
        self.seen: list[tuple[tuple[int, ...], torch.Tensor | None]] = []   # (context, inner's last logits)
        self.fed = 0
        self.modes: list[bool] = []

    @property
    def generation_config(self):
        return getattr(self.inner, "generation_config", None)

    def target(self, context: list[int]) -> int | None:
        """The scripted next token after `context` (prompt + response so far), or FREE."""
        prompt = next(p for p in self.scripts if tuple(context[:len(p)]) == p)
        turns, response = self.scripts[prompt], context[len(prompt):]
        turn, start = 0, 0
        for i in range(len(response)):
            for end in self.segment_ends:
                if i + 1 >= len(end) and response[i + 1 - len(end):i + 1] == end:
                    turn, start = turn + 1, i + 1
        script = turns[turn] if turn < len(turns) else []
        step = len(response) - start
        return script[step] if step < len(script) else FREE

    def forward(self, input_ids, attention_mask, position_ids, past_key_values, use_cache, logits_to_keep):
        assert use_cache and logits_to_keep == 1 and isinstance(past_key_values, Cache)
        self.modes.append(self.training)
        B, T = input_ids.shape
        if self.inner is not None:
            logits = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                past_key_values=past_key_values, use_cache=True,
                                logits_to_keep=1).logits                                   # (B, 1, V)
        else:
            logits = torch.zeros(B, 1, self.vocab_size)
        as_keys = input_ids[:, None, :, None].float()                                       # (B, 1, T, 1)
        ids, _ = past_key_values.update(as_keys, as_keys, self.id_layer)                   # (B, 1, L, 1)
        real = attention_mask.bool()                                                        # (B, L)
        assert real.shape[1] == ids.shape[2], "the attention mask must cover cache + new tokens"
        logits = logits.clone()
        for b in range(B):
            context = ids[b, 0, real[b], 0].long().tolist()
            n_new = int(real[b, -T:].sum())
            assert n_new >= 1 and real[b, real.shape[1] - n_new:].all(), "new tokens are left-padded"
            assert position_ids[b, T - n_new:].tolist() == list(range(len(context) - n_new, len(context)))
            self.fed += n_new
            self.seen.append((tuple(context), logits[b, -1].clone() if self.inner is not None else None))
            token = self.target(context)
            if token is FREE and self.inner is None:
                token = self.filler
            if token is not FREE:
                logits[b, -1, token] += 1e4
        return SimpleNamespace(logits=logits)


class ScriptedRetriever:
    """Made-up passages that name the query (longer queries give longer passages); records every call."""

    def __init__(self):
        self.calls: list[tuple[list[str], int]] = []

    def search(self, queries: list[str], topk: int) -> list[list[dict]]:
        self.calls.append((list(queries), topk))
        return [self.hits(q, topk) for q in queries]

    @staticmethod
    def hits(query: str, topk: int) -> list[dict]:
        text = f"{query} is told of here. " * (1 + len(query) % 3)
        return [{"id": f"{query}-{i}", "contents": f"Page {i} on {query}\n{text}"} for i in range(topk)]


def random_qwen2(tokenizer, seed: int = 1) -> Qwen2ForCausalLM:
    """The conftest `tiny_model` sizes with an untied output layer: a tied random model's argmax is
    its last input token (it prints "\\n" forever), which would make greedy checks toothless."""
    config = Qwen2Config(vocab_size=len(tokenizer), tie_word_embeddings=False, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **demo.MODEL_SIZES["test"])
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def say(tokenizer, *pieces) -> list:
    """A turn's script: strings are tokenised, ints are that many FREE positions, the string "eos" is eos."""
    out = []
    for piece in pieces:
        if isinstance(piece, int):
            out += [FREE] * piece
        else:
            out += [tokenizer.eos_token_id] if piece == "eos" else encode_text(tokenizer, piece)
    return out


def expected_observation(hits: list[dict]) -> str:
    """docs/method.md §2's observation text, written out independently of rollout.py."""
    docs = ""
    for i, hit in enumerate(hits):
        title, text = hit["contents"].split("\n", 1)
        docs += f"Doc {i + 1}(Title: {title}) {text}\n"
    return f"\n\n<information>{docs.strip()}</information>\n\n"


def greedy(**overrides) -> RolloutConfig:
    return RolloutConfig(**{"greedy": True, "max_turns": 3, "max_new_tokens": 16, **overrides})


class NoRetriever:
    """For rollouts in which searching must be impossible."""

    def search(self, queries, topk):
        raise AssertionError(f"searched {queries} in a rollout that must not search")


# -----------------------------------------------------------------------------
# Token fidelity: a real Qwen2 steered to search, one greedy rollout shared by the tests below

@pytest.fixture(scope="module")
def searching_run(world, tokenizer):
    """Four rows that search 2, 1, 1 and 0 times and end turns at different steps (tags, budget, eos),
    so the batch is ragged in cache length, pending length and turn length at once."""
    questions = [q["question"] for q in world.test[:4]]
    turns = [[(3, "<search> alpha </search>\n"), (4, "<search> beta gamma </search>\n"),
              (2, "<answer> delta </answer>")],
             [(7, "<search> one </search>\n"), (1, "<answer> x </answer>\n")],
             [(40,), ("<search> kappa </search>",), (4, "eos"), ("<answer> z </answer>",)],  # 40 FREE > budget 16
             [("<answer> now </answer>",)]]
    scripts = {q: [say(tokenizer, *turn) for turn in row] for q, row in zip(questions, turns)}
    model = ScriptedLM(tokenizer, scripts, inner=random_qwen2(tokenizer))
    trajs = rollout(model, tokenizer, questions, ScriptedRetriever(), greedy())
    return questions, scripts, model, trajs


def test_searching_run_is_ragged(searching_run, tokenizer):
    """The fixture's rows really do what the tests below rely on."""
    _, _, _, trajs = searching_run
    assert [t.num_searches for t in trajs] == [2, 1, 1, 0]
    assert [t.num_invalid for t in trajs] == [0, 0, 2, 0]         # row 2: the budget (turn 0), the eos (turn 2)
    assert [t.answered for t in trajs] == [True, True, True, True]
    assert [len(t.turns) for t in trajs] == [3, 2, 4, 1]
    # row 2 ran out of its budget in turn 0
    assert tokenizer.eos_token_id not in trajs[2].input_ids[trajs[2].prompt_length:] and trajs[2].truncated
    assert len({len(t.input_ids) for t in trajs}) == 4


def test_teacher_forced_forward_reproduces_every_sampled_token(searching_run):
    """One forward over each final sequence gives, at every loss position, the logits the rollout
    sampled from and their argmax: cache continuation across observations, left padding and
    position ids are all right (a wrong position or a leaked padding column would shift them)."""
    _, _, model, trajs = searching_run
    seen = dict(model.seen)
    n_free = 0
    for traj in trajs:
        ids = traj.input_ids
        with torch.no_grad():
            logits = model.inner(input_ids=torch.tensor([ids])).logits[0]            # (T, V)
        for t in range(traj.prompt_length, len(ids)):
            if not traj.loss_mask[t]:
                continue
            context = tuple(ids[:t])
            assert context in seen, f"the rollout never showed the model {t} tokens of its own row"
            torch.testing.assert_close(seen[context], logits[t - 1], atol=1e-5, rtol=1e-4)
            scripted = model.target(ids[:t])
            if scripted is FREE:
                assert logits[t - 1].argmax().item() == ids[t]
                n_free += 1
            else:
                assert ids[t] == scripted
    assert n_free >= 30    # plenty of positions where the real model chose the token


def test_model_only_ever_sees_a_prefix_of_its_own_row(searching_run):
    _, _, model, trajs = searching_run
    rows = {tuple(t.input_ids[:t.prompt_length]): t.input_ids for t in trajs}
    for context, _ in model.seen:
        prompt = next(p for p in rows if context[:len(p)] == p)
        assert list(context) == rows[prompt][:len(context)]


def test_appending_an_observation_feeds_only_the_new_tokens(searching_run):
    """Real tokens fed to the model over the whole rollout = every token of the final sequences
    except each row's last sampled one (never fed): no context is ever prefilled twice."""
    _, _, model, trajs = searching_run
    assert model.fed == sum(len(t.input_ids) - 1 for t in trajs)


def test_a_rows_greedy_rollout_is_the_same_alone_and_in_a_batch(searching_run, tokenizer):
    questions, scripts, model, trajs = searching_run
    for question, in_batch in zip(questions, trajs):
        alone = rollout(ScriptedLM(tokenizer, scripts, inner=model.inner), tokenizer, [question],
                        ScriptedRetriever(), greedy())[0]
        assert alone.input_ids == in_batch.input_ids
        assert alone.loss_mask == in_batch.loss_mask


@pytest.mark.parametrize("keep", [[0, 1, 2, 3, 4], [0, 1, 3], [2, 4], [1, 2, 3, 4], [4], []])
def test_turn_cache_keeps_the_selected_rows_in_order_and_grows_in_place(keep):
    """A row that ends its turn leaves: the rows kept move to the front of the reserved buffers
    (filled columns only), in their order, with the strides they had; later writes go after them."""
    torch.manual_seed(0)
    layer = rollout_module._TurnLayer(room=6)
    prefill = torch.randn(5, 2, 3, 4), torch.randn(5, 2, 3, 4)                  # (R, H, n, D)
    layer.update(*prefill)
    step = torch.randn(5, 2, 1, 4), torch.randn(5, 2, 1, 4)
    layer.update(*step)
    strides = layer.keys.stride()
    layer.batch_select_indices(torch.tensor(keep, dtype=torch.long))
    for got, first, then in ((layer.keys, prefill[0], step[0]), (layer.values, prefill[1], step[1])):
        torch.testing.assert_close(got, torch.cat([first, then], dim=2)[keep], rtol=0, atol=0)
    assert layer.keys.stride() == strides and layer.keys.shape == (len(keep), 2, 4, 4)
    more = torch.randn(len(keep), 2, 1, 4), torch.randn(len(keep), 2, 1, 4)
    for got, first, then, last in zip(layer.update(*more), prefill, step, more):
        torch.testing.assert_close(got, torch.cat([torch.cat([first, then], dim=2)[keep], last], dim=2), rtol=0, atol=0)


# -----------------------------------------------------------------------------
# Without searches the rollout is plain greedy decoding

def _generate(model, tokenizer, questions: list[str], max_new_tokens: int) -> list[list[int]]:
    """model.generate on the left-padded prompts; each row's prompt + new tokens up to its first eos."""
    prompts = [prompt_ids(tokenizer, q) for q in questions]
    width = max(map(len, prompts))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False)
    rows = []
    for p, new in zip(prompts, out[:, width:].tolist()):
        if tokenizer.eos_token_id in new:
            new = new[:new.index(tokenizer.eos_token_id) + 1]
        rows.append(p + new)
    return rows


def test_greedy_rollout_without_search_equals_generate(world, tokenizer):
    """max_turns=0: the only turn is the final one, where no search runs. Token for token the same as
    model.generate, for each question alone and for the (left-padded) batch."""
    model = random_qwen2(tokenizer)
    by_length = {len(prompt_ids(tokenizer, q["question"])): q["question"] for q in world.test[:50]}
    questions = [by_length[n] for n in sorted(by_length)[:3]]               # 3 prompt lengths: padding
    assert len(questions) == 3
    config = greedy(max_turns=0, max_new_tokens=24)
    batch = rollout(model, tokenizer, questions, NoRetriever(), config)
    assert _generate(model, tokenizer, questions, 24) == [t.input_ids for t in batch]
    for question, traj in zip(questions, batch):
        alone = rollout(model, tokenizer, [question], NoRetriever(), config)[0]
        assert _generate(model, tokenizer, [question], 24) == [alone.input_ids] == [traj.input_ids]
        assert len(set(traj.input_ids[traj.prompt_length:])) > 5        # not a degenerate echo


def test_bfloat16_rollout_equals_generate(world, tokenizer):
    model = random_qwen2(tokenizer).to(torch.bfloat16)
    question = world.test[0]["question"]
    traj = rollout(model, tokenizer, [question], NoRetriever(), greedy(max_turns=0, max_new_tokens=16))[0]
    assert _generate(model, tokenizer, [question], 16) == [traj.input_ids]


def test_embedding_rows_past_the_tokenizer_are_never_sampled(world, tokenizer):
    """Qwen2.5 pads its embedding matrix past the tokenizer (151,936 rows for 151,665 tokens). Here the
    8 padding rows of the output layer are made to win every argmax and most of the sampling mass:
    the rollout must still emit only ids the tokenizer has, and otherwise equal the unpadded model."""
    n = len(tokenizer)
    plain = random_qwen2(tokenizer)
    config = Qwen2Config(**{**plain.config.to_dict(), "vocab_size": n + 8})
    padded = Qwen2ForCausalLM(config).eval()
    state = plain.state_dict()
    first = torch.tensor([prompt_ids(tokenizer, world.test[0]["question"])])
    with torch.no_grad():
        favourite = plain(first).logits[0, -1].argmax()             # the plain model's first choice
        for name, tensor in padded.state_dict().items():            # padding rows: 20 × its output row
            if tensor.shape == state[name].shape:
                tensor.copy_(state[name])
            else:                                                   # embed_tokens and lm_head
                tensor.copy_(torch.cat([state[name], 20 * state[name][favourite].expand(8, -1)]))
        logits = padded(first).logits[0, -1]
    assert logits.argmax() >= n                                      # the padding rows really do win
    questions = [q["question"] for q in world.test[:2]]
    for config in (greedy(max_turns=0), RolloutConfig(max_turns=0, max_new_tokens=16, seed=0)):
        got = rollout(padded, tokenizer, questions, NoRetriever(), config)
        assert all(max(t.input_ids) < n for t in got)
    ref = rollout(plain, tokenizer, questions, NoRetriever(), greedy(max_turns=0))
    assert [t.input_ids for t in rollout(padded, tokenizer, questions, NoRetriever(), greedy(max_turns=0))] \
        == [t.input_ids for t in ref]


# -----------------------------------------------------------------------------
# Masks: the loss mask is 1 exactly on sampled tokens; forced tokens are exactly what was inserted

def test_masked_tokens_decode_to_inserted_observations_and_nudges(world, tokenizer, segments):
    q0, q1 = (q["question"] for q in world.test[:2])
    turns = {q0: ["<think> a </think>\n<search> first query </search>\n", "no open tag </search>",
                  "<search> second </search>", "<answer> done </answer>"],
             q1: ["<search> q one </search>", 30, "<search> q two </search>\n", "<answer> y </answer>"]}
    scripts = {q: [say(tokenizer, turn) for turn in row] for q, row in turns.items()}
    retriever = ScriptedRetriever()
    trajs = rollout(ScriptedLM(tokenizer, scripts), tokenizer, [q0, q1], retriever,
                    greedy(max_turns=4, max_new_tokens=20))
    assert retriever.calls == [(["first query", "q one"], 3), (["second", "q two"], 3)]   # one call per round
    hits = lambda q: ScriptedRetriever.hits(q, 3)  # noqa: E731
    expected = [[expected_observation(hits("first query")), INVALID_ACTION, expected_observation(hits("second"))],
                [expected_observation(hits("q one")), INVALID_ACTION, expected_observation(hits("q two"))]]
    for traj, inserted in zip(trajs, expected):
        assert len(traj.loss_mask) == len(traj.input_ids)
        assert traj.loss_mask[:traj.prompt_length] == [0] * traj.prompt_length
        runs = segments(traj)
        assert [m for m, _ in runs] == [1, 0, 1, 0, 1, 0, 1]
        assert [tokenizer.decode(ids) for m, ids in runs if m == 0] == inserted
        assert [tokenizer.decode(ids) for m, ids in runs if m == 1] == traj.turns
        assert traj.response_text == "".join(tokenizer.decode(ids) for _, ids in runs)
        assert traj.answered and traj.num_searches == 2 and traj.num_invalid == 1
    assert trajs[0].queries == ["first query", "second"] and trajs[1].queries == ["q one", "q two"]
    assert trajs[0].hits == [hits("first query"), hits("second")]


def test_search_fn_gets_each_querys_question_index_and_its_hits_are_inserted(world, tokenizer, segments):
    """search_fn replaces retriever.search: it learns whose query each one is (the probe relies on
    this to place each question's own evidence), once per turn, and what it returns is observed."""
    questions = [q["question"] for q in world.test[:3]]
    turns = {questions[0]: ["<search> a </search>", "<answer> x </answer>"],
             questions[1]: ["<answer> y </answer>"],
             questions[2]: ["<search> c </search>", "<search> c2 </search>", "<answer> z </answer>"]}
    scripts = {q: [say(tokenizer, turn) for turn in row] for q, row in turns.items()}
    calls = []

    def search_fn(indices, queries):
        calls.append((list(indices), list(queries)))
        return [ScriptedRetriever.hits(f"{q} for row {i}", 2) for i, q in zip(indices, queries)]

    trajs = rollout(ScriptedLM(tokenizer, scripts), tokenizer, questions, NoRetriever(),
                    greedy(max_new_tokens=20), search_fn=search_fn)
    assert calls == [([0, 2], ["a", "c"]), ([2], ["c2"])]
    assert trajs[2].hits == [ScriptedRetriever.hits("c for row 2", 2), ScriptedRetriever.hits("c2 for row 2", 2)]
    observed = [tokenizer.decode(ids) for m, ids in segments(trajs[2]) if m == 0]
    assert observed == [expected_observation(h) for h in trajs[2].hits]


def test_rollout_formats_passages_exactly_as_the_retriever_does(world, retriever):
    """rollout.py keeps its own 3-line copy of the formatter (to need nothing from retriever.py)."""
    for hits in retriever.search([q["question"] for q in world.test[:20]] + ["zzz unknown"], topk=3) + [[]]:
        assert rollout_module.format_passages(hits) == retriever_module.format_passages(hits)


@pytest.mark.parametrize("max_obs_tokens", [8, 30, 500])
def test_observation_ends_with_closing_tag_even_when_truncated(world, tokenizer, max_obs_tokens, segments):
    question = world.test[0]["question"]
    scripts = {question: [say(tokenizer, "<search> a rather long query </search>"),
                          say(tokenizer, "<answer> z </answer>")]}
    traj = rollout(ScriptedLM(tokenizer, scripts), tokenizer, [question], ScriptedRetriever(),
                   greedy(max_obs_tokens=max_obs_tokens))[0]
    (_, observation), = [run for run in segments(traj) if run[0] == 0]
    full = expected_observation(ScriptedRetriever.hits("a rather long query", 3))
    close = encode_text(tokenizer, "</information>\n\n")
    text = tokenizer.decode(observation)
    assert observation[-len(close):] == close and text.startswith("\n\n<information>")
    cut = len(encode_text(tokenizer, full)) - len(close) > max_obs_tokens
    assert traj.obs_truncated == cut
    if cut:
        assert len(observation) == max_obs_tokens + len(close)
        assert full.startswith(text[:-len("</information>\n\n")])
    else:
        assert text == full


def whole_text_observation_ids(tokenizer, hits, max_obs_tokens):
    """observation_ids as it was first written: tokenise every passage, then cut the ids."""
    head = encode_text(tokenizer, OBS_OPEN + format_passages(hits).strip())
    return head[:max_obs_tokens] + encode_text(tokenizer, OBS_CLOSE), len(head) > max_obs_tokens


class CountingTokenizer:
    """The tokenizer, counting the characters it is asked to tokenise."""

    def __init__(self, inner):
        self.inner, self.chars = inner, 0

    def __call__(self, text, **kwargs):
        self.chars += len(text)
        return self.inner(text, **kwargs)


def long_passages(world):
    """Hits whose text is far past any cut: many world passages, a run of spaces (long tokens), CJK
    (several byte-level tokens a character), a long unbroken word, and digits."""
    texts = [p["contents"] for p in world.corpus]
    return [
        [{"contents": "Many\n" + " ".join(texts[:200])}],
        [{"contents": "Spaces\n" + ("a" + " " * 3000 + "b\n") * 20}],
        [{"contents": "東京\n" + "東京は日本の首都です。" * 800}],
        [{"contents": "Word\n" + "velmor" * 2000 + " works " * 50}],
        [{"contents": "Long words\n" + " headquartered" * 3000}],       # 14 characters a token
        [{"contents": "Digits\n" + "".join(str(i) for i in range(20000))}],
        [{"contents": t} for t in texts[:3]],                     # normal: three passages, often uncut
    ]


@pytest.mark.parametrize("max_obs_tokens", [0, 1, 8, 30, 500, 2000])
def test_observation_ids_equal_tokenising_the_whole_text_then_cutting(world, tokenizer, retriever, max_obs_tokens):
    hit_lists = retriever.search([q["question"] for q in world.test[:30]] + ["zzz"], topk=3) + [[]]
    for hits in hit_lists + long_passages(world):
        assert observation_ids(tokenizer, hits, max_obs_tokens) == \
            whole_text_observation_ids(tokenizer, hits, max_obs_tokens)


def test_a_huge_passage_is_not_tokenised_past_the_cut(world, tokenizer):
    """A 4 MB passage: only a prefix of a few thousand characters reaches the tokenizer (an 18 MB one
    took 43.5 s per question when the whole text was tokenised)."""
    hits = [{"contents": "Huge\n" + " ".join(p["contents"] for p in world.corpus) * 40}]
    assert len(hits[0]["contents"]) > 4_000_000
    counting = CountingTokenizer(tokenizer)
    ids, cut = observation_ids(counting, hits, 500)
    head = [{"contents": hits[0]["contents"][:100_000]}]     # tokenising all 4 MB here would take ~20 s
    assert cut and (ids, cut) == whole_text_observation_ids(tokenizer, head, 500)
    assert counting.chars < 20_000          # (500 + 64 slack tokens) * 8 characters, + the closing tag


def test_a_text_of_long_tokens_is_tokenised_from_a_longer_prefix(tokenizer):
    """" headquartered" is one token of 14 characters: the first prefix, 8 characters a token, is too
    short to hold max_obs_tokens + slack tokens, so a longer one is tokenised -- never the whole text."""
    hits = [{"contents": "Long words\n" + " headquartered" * 20000}]
    counting = CountingTokenizer(tokenizer)
    assert observation_ids(counting, hits, 500) == whole_text_observation_ids(tokenizer, hits, 500)
    assert (500 + rollout_module._CUT_SLACK_TOKENS) * rollout_module._CHARS_PER_TOKEN < counting.chars < 50_000


# -----------------------------------------------------------------------------
# The turn logic

def test_turn_budget_ends_a_turn_and_the_nudge_follows(world, tokenizer, segments):
    question = world.test[0]["question"]
    nudge = len(encode_text(tokenizer, INVALID_ACTION))
    traj = rollout(ScriptedLM(tokenizer, {question: []}), tokenizer, [question], NoRetriever(),
                   greedy(max_turns=2, max_new_tokens=7))[0]
    assert [(m, len(ids)) for m, ids in segments(traj)] == [(1, 7), (0, nudge), (1, 7), (0, nudge), (1, 7)]
    assert (traj.num_turns, traj.num_invalid, traj.truncated, traj.answered) == (3, 2, True, False)


def test_final_turn_does_not_execute_a_search(world, tokenizer):
    question = world.test[0]["question"]
    scripts = {question: [say(tokenizer, f"<search> q{k} </search>\n") for k in range(3)]}
    retriever = ScriptedRetriever()
    traj = rollout(ScriptedLM(tokenizer, scripts), tokenizer, [question], retriever, greedy(max_turns=2))[0]
    assert retriever.calls == [(["q0"], 3), (["q1"], 3)]
    assert traj.queries == ["q0", "q1"] and traj.num_searches == 2 and traj.num_turns == 3
    assert traj.turns[-1] == "<search> q2 </search>\n"
    assert traj.input_ids[-len(scripts[question][2]):] == scripts[question][2]    # nothing after it
    assert traj.loss_mask[-1] == 1 and (traj.num_invalid, traj.answered, traj.truncated) == (0, False, False)


def test_invalid_actions_get_the_nudge_and_a_lone_answer_close_is_one_of_them(world, tokenizer, segments):
    """Search-R1 (the default): a turn without a complete <search>/<answer> pair — an orphan </search>,
    an unclosed <search> running out of budget, an </answer> that closes no <answer> — is an invalid action:
    the nudge (loss 0) follows and the rollout goes on."""
    q0, q1 = (q["question"] for q in world.test[:2])
    scripts = {q0: [say(tokenizer, "thinking </search>"), say(tokenizer, "<search> never closed", 30),
                    say(tokenizer, "<answer> fine </answer>")],
               q1: [say(tokenizer, "just x </answer>"), say(tokenizer, "<answer> x </answer>")]}
    trajs = rollout(ScriptedLM(tokenizer, scripts), tokenizer, [q0, q1], NoRetriever(), greedy())
    assert [tokenizer.decode(ids) for m, ids in segments(trajs[0]) if m == 0] == [INVALID_ACTION] * 2
    assert trajs[0].turns[0] == "thinking </search>" and trajs[0].turns[2] == "<answer> fine </answer>"
    assert (trajs[0].num_invalid, trajs[0].answered, trajs[0].truncated) == (2, True, True)
    assert [(m, tokenizer.decode(ids)) for m, ids in segments(trajs[1])] == [
        (1, "just x </answer>"), (0, INVALID_ACTION), (1, "<answer> x </answer>")]
    assert trajs[1].answered and trajs[1].num_invalid == 1 and trajs[1].num_turns == 2


def test_eos_ends_option_a_lone_answer_close_ends_the_row(world, tokenizer):
    """RolloutConfig.eos_ends (the older rule): an orphan </answer> ends the rollout, unanswered, no nudge."""
    q1 = world.test[1]["question"]
    scripts = {q1: [say(tokenizer, "just x </answer>", 30), say(tokenizer, "<answer> x </answer>")]}
    traj = rollout(ScriptedLM(tokenizer, scripts), tokenizer, [q1], NoRetriever(), greedy(eos_ends=True))[0]
    assert traj.turns == ["just x </answer>"] and not traj.answered and traj.num_invalid == 0
    assert traj.input_ids[traj.prompt_length:] == scripts[q1][0][:len(encode_text(tokenizer, "just x </answer>"))]


def test_eos_is_dropped_and_nudged_as_an_invalid_action(world, tokenizer, segments):
    """Search-R1 (the default): an eos ends the turn, never enters the ids (so never the loss), and the
    turn is an invalid action — the nudge follows and the rollout goes on from the tokens before the eos;
    on the final turn the rollout simply ends, still without the eos."""
    q0, q1 = (q["question"] for q in world.test[:2])
    scripts = {q0: [say(tokenizer, "<think> a", "eos"), say(tokenizer, "<answer> b </answer>")],
               q1: [say(tokenizer, "eos")] * 4}
    t0, t1 = rollout(ScriptedLM(tokenizer, scripts), tokenizer, [q0, q1], NoRetriever(), greedy())
    assert [(m, tokenizer.decode(ids)) for m, ids in segments(t0)] == [
        (1, "<think> a"), (0, INVALID_ACTION), (1, "<answer> b </answer>")]
    assert (t0.num_turns, t0.num_invalid, t0.answered, t0.truncated) == (2, 1, True, False)
    nudge = encode_text(tokenizer, INVALID_ACTION)
    assert t1.input_ids[t1.prompt_length:] == nudge * 3 and t1.loss_mask[t1.prompt_length:] == [0] * len(nudge) * 3
    assert (t1.num_turns, t1.num_invalid, t1.answered) == (4, 3, False)      # max_turns 3: the 4th is final
    assert tokenizer.eos_token_id not in t0.input_ids[t0.prompt_length:] + t1.input_ids[t1.prompt_length:]


def test_eos_ends_option_ends_the_row_and_keeps_the_eos_as_sampled(world, tokenizer):
    """RolloutConfig.eos_ends: the eos the model sampled stays, with loss 1; other rows go on. Nothing
    depends on pad_id, so a tokenizer whose pad is its eos gives the same ids and masks."""
    pad_is_eos = copy.deepcopy(tokenizer)
    pad_is_eos.pad_token = pad_is_eos.eos_token
    assert pad_is_eos.pad_token_id == tokenizer.eos_token_id != tokenizer.pad_token_id
    q0, q1 = (q["question"] for q in world.test[:2])
    scripts = {q0: [say(tokenizer, "<think> a", "eos")],
               q1: [say(tokenizer, 3, "<search> b </search>"), say(tokenizer, "<answer> c </answer>", "eos")]}
    runs = [rollout(ScriptedLM(tok, scripts), tok, [q0, q1], ScriptedRetriever(), greedy(eos_ends=True))
            for tok in (tokenizer, pad_is_eos)]
    t0, t1 = runs[0]
    assert t0.input_ids[t0.prompt_length:] == scripts[q0][0] and t0.loss_mask[-1] == 1
    assert (t0.num_turns, t0.answered, t0.response_text) == (1, False, "<think> a")
    assert t1.answered and t1.input_ids[-1] != tokenizer.eos_token_id and t1.num_searches == 1
    assert [(t.input_ids, t.loss_mask) for t in runs[0]] == [(t.input_ids, t.loss_mask) for t in runs[1]]


def test_max_total_tokens_is_a_hard_cap(world, tokenizer):
    """Sampling stops when prompt + response reach the cap, in any turn; forced tokens that would leave
    no room for a sampled token (here the observation) are not appended — the row ends instead."""
    question = world.test[0]["question"]
    search, answer = say(tokenizer, "<search> q </search>"), say(tokenizer, "<answer> a </answer>")
    prompt = prompt_ids(tokenizer, question)
    observation = observation_ids(tokenizer, ScriptedRetriever.hits("q", 3), 500)[0]

    def run(cap):
        return rollout(ScriptedLM(tokenizer, {question: [search, answer]}), tokenizer, [question],
                       ScriptedRetriever(), greedy(max_total_tokens=cap))[0]

    in_first_turn = run(len(prompt) + 3)
    assert in_first_turn.input_ids == prompt + search[:3] and in_first_turn.truncated
    no_room_to_read = run(len(prompt) + len(search) + len(observation))
    assert no_room_to_read.input_ids == prompt + search and no_room_to_read.truncated
    assert no_room_to_read.num_searches == 0 and no_room_to_read.queries == []
    in_answer = run(len(prompt) + len(search) + len(observation) + 3)
    assert in_answer.input_ids == prompt + search + observation + answer[:3]
    assert in_answer.truncated and in_answer.num_searches == 1 and not in_answer.answered
    uncapped = run(None)
    assert uncapped.input_ids == prompt + search + observation + answer and not uncapped.truncated


def test_prompt_reaching_max_total_tokens_is_an_error(world, tokenizer):
    question = world.test[0]["question"]
    cap = len(prompt_ids(tokenizer, question))
    with pytest.raises(ValueError, match="max_total_tokens"):
        rollout(ScriptedLM(tokenizer, {question: []}), tokenizer, [question], NoRetriever(),
                greedy(max_total_tokens=cap))


def test_empty_query_is_sent_to_the_retriever(world, tokenizer, retriever, segments):
    """`<search> </search>` is a search for "" (as in Search-R1); BM25 finds nothing for it, and the
    observation is the empty <information></information> block."""
    question = world.test[0]["question"]
    scripts = {question: [say(tokenizer, "<search> </search>"), say(tokenizer, "<answer> a </answer>")]}
    scripted = ScriptedRetriever()
    traj = rollout(ScriptedLM(tokenizer, scripts), tokenizer, [question], scripted, greedy())[0]
    assert scripted.calls == [([""], 3)] and traj.queries == [""] and traj.num_searches == 1
    traj = rollout(ScriptedLM(tokenizer, scripts), tokenizer, [question], retriever, greedy())[0]
    assert traj.hits == [[]] and traj.answered
    observations = [tokenizer.decode(ids) for m, ids in segments(traj) if m == 0]
    assert observations == ["\n\n<information></information>\n\n"]


def _one_char_tokens(tokenizer, text: str) -> list[int]:
    ids = [encode_text(tokenizer, ch) for ch in text]
    assert all(len(i) == 1 for i in ids)
    return [i[0] for i in ids]


@pytest.mark.parametrize("text, tag", [
    ("<think> t </think>\n<search> velmor works </search>\n\nnot reached", "</search>"),  # "Ġ</" "search" ">Ċ"
    ("<answer> x </answer>\nnot reached", "</answer>"),                                    # "Ġ</" "answer" ">Ċ"
    ("<search>q</search>not reached", "</search>"),
    (None, "</search>"),                                                                  # one token per character
])
def test_tag_split_across_pieces_stops_at_the_completing_token(world, tokenizer, text, tag, segments):
    """The turn ends at the first token whose text completes the tag — even when that token also
    carries what follows (">\\n") — and that token is kept exactly as sampled, not re-tokenised."""
    question = world.test[0]["question"]
    script = (say(tokenizer, text) if text is not None
              else _one_char_tokens(tokenizer, "<search> q </search> not reached"))
    stop = next(i for i in range(len(script)) if tag in tokenizer.decode(script[:i + 1]))
    assert stop < len(script) - 1
    traj = rollout(ScriptedLM(tokenizer, {question: [script, say(tokenizer, "<answer> a </answer>")]}), tokenizer,
                   [question], ScriptedRetriever(), greedy(max_new_tokens=40))[0]
    first_turn = segments(traj)[0][1]
    assert first_turn == script[:stop + 1]
    assert traj.turns[0] == tokenizer.decode(script[:stop + 1])
    if text is not None and text.startswith("<think>"):
        assert tokenizer.convert_ids_to_tokens(first_turn[-3:]) == ["Ġ</", "search", ">Ċ"]


def test_incomplete_tag_does_not_end_the_turn(world, tokenizer):
    question = world.test[0]["question"]
    script = say(tokenizer, "<search> q </search", 30)
    traj = rollout(ScriptedLM(tokenizer, {question: [script]}), tokenizer, [question], NoRetriever(),
                   greedy(max_turns=0, max_new_tokens=20))[0]
    assert len(traj.input_ids) - traj.prompt_length == 20 and traj.truncated


# -----------------------------------------------------------------------------
# Sampling

def test_same_seed_gives_identical_rollouts(world, tokenizer):
    model = random_qwen2(tokenizer)
    questions = [q["question"] for q in world.test[:3]]

    def run(seed=None, generator=None, greedy=False):
        config = RolloutConfig(max_turns=1, max_new_tokens=12, top_p=0.9, seed=seed, greedy=greedy)
        trajs = rollout(model, tokenizer, questions, NoRetriever(), config, generator=generator)
        return [t.input_ids for t in trajs]

    first = run(seed=7)
    assert run(seed=7) == first
    assert run(generator=torch.Generator().manual_seed(7)) == first
    assert run(seed=8) != first
    assert run(greedy=True) != first            # it really sampled


def test_top_p_keeps_the_smallest_prefix_that_reaches_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(20000, 4)
    generator = torch.Generator().manual_seed(0)
    counts = torch.bincount(_sample(logits, RolloutConfig(top_p=0.7), generator), minlength=4)
    assert counts[2:].sum() == 0                                   # 0.5 + 0.3 reaches 0.7: the rest is cut
    assert abs(counts[0].item() / 20000 - 0.5 / 0.8) < 0.02         # renormalised over the nucleus
    counts = torch.bincount(_sample(logits, RolloutConfig(top_p=0.5), generator), minlength=4)
    assert counts.tolist() == [20000, 0, 0, 0]
    counts = torch.bincount(_sample(logits, RolloutConfig(temperature=2.0), generator), minlength=4)
    flat = probs.sqrt() / probs.sqrt().sum()                       # softmax(log p / 2)
    torch.testing.assert_close(counts / 20000, flat, atol=0.015, rtol=0)


# -----------------------------------------------------------------------------
# Tokenizers and models as users have them

def test_prompt_is_the_template_as_the_one_user_message(tokenizer):
    text = tokenizer.decode(prompt_ids(tokenizer, "  Who founded Velmor Works "))
    assert text == ("<|im_start|>user\n" + PROMPT_TEMPLATE.format(question="Who founded Velmor Works?")
                    + "<|im_end|>\n<|im_start|>assistant\n")


def test_without_chat_template_the_prompt_is_the_raw_template(world, tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    question = world.test[0]["question"]
    scripts = {question: [say(plain, "<answer> a </answer>")]}
    traj = rollout(ScriptedLM(plain, scripts), plain, [question], NoRetriever(), greedy())[0]
    raw_template = PROMPT_TEMPLATE.format(question=format_question(question))
    assert traj.input_ids[:traj.prompt_length] == encode_text(plain, raw_template)
    assert traj.answered and traj.response_text == "<answer> a </answer>"


def test_a_rows_own_prompt_chat_replaces_the_built_prompt(world, tokenizer):
    """--prompt-from data: the rollout starts from the row's chat rendered by the chat template (as
    Search-R1's rl_dataset.py renders its prompt column); the question is still the question."""
    question = world.test[0]["question"]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Find it: " + question}]
    rendered = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    lm = ScriptedLM(tokenizer, {})
    lm.scripts = {tuple(encode_text(tokenizer, rendered)): [say(tokenizer, "<answer> a </answer>")]}
    traj = rollout(lm, tokenizer, [question], NoRetriever(), greedy(), chats=[chat])[0]
    assert traj.input_ids[:traj.prompt_length] == encode_text(tokenizer, rendered)
    assert traj.question == question and traj.answered and traj.response_text == "<answer> a </answer>"
    with pytest.raises(ValueError, match="chats has 2 rows for 1 questions"):
        rollout(lm, tokenizer, [question], NoRetriever(), greedy(), chats=[chat, chat])


def test_row_chats_reads_each_rows_prompt_and_names_a_row_without_one(world):
    rows = [{"id": "a", "question": "Q?", "prompt": [{"role": "user", "content": "x"}]}, {"id": "b", "question": "R?"}]
    assert rollout_module.row_chats(rows, "question") is None
    assert rollout_module.row_chats(rows[:1], "data") == [rows[0]["prompt"]]
    with pytest.raises(ValueError, match="question id='b' has no 'prompt'.*--prompt-from question"):
        rollout_module.row_chats(rows, "data")
    with pytest.raises(ValueError, match="prompt_from='file'"):
        rollout_module.row_chats(rows, "file")
    with pytest.raises(ValueError, match="RolloutConfig.prompt_from='file': must be one of"):
        RolloutConfig(prompt_from="file")


def test_the_length_check_measures_the_prompt_the_rollout_will_use(world, tokenizer):
    row = {**world.test[0], "prompt": [{"role": "user", "content": "word " * 400}]}
    budget = len(prompt_ids(tokenizer, row["question"])) + 5
    rollout_module.check_prompts(tokenizer, [row], budget, "question")              # the built prompt fits
    with pytest.raises(ValueError, match=r"question id=.*its prompt is \d+ tokens"):
        rollout_module.check_prompts(tokenizer, [row], budget, "question", "data")   # the row's own does not
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(ValueError, match="a prompt chat of 2 messages needs a tokenizer with a chat template"):
        prompt_ids(plain, "Q?", [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}])


def test_rollout_runs_in_eval_mode_and_restores_the_training_flag(world, tokenizer):
    question = world.test[0]["question"]
    model = ScriptedLM(tokenizer, {question: [say(tokenizer, "<answer> a </answer>")]}).train()
    rollout(model, tokenizer, [question], NoRetriever(), greedy())
    assert model.modes and not any(model.modes) and model.training
    model = ScriptedLM(tokenizer, {question: [say(tokenizer, "<search> q </search>")]}).train()
    with pytest.raises(AssertionError, match="must not search"):
        rollout(model, tokenizer, [question], NoRetriever(), greedy())
    assert model.training                                           # restored on the way out of an error too


def test_works_on_the_unwrapped_module_of_a_ddp_model(world, tokenizer, tmp_path):
    """Training calls rollout(ddp.module, ...) between DDP steps: the rollout gives what the bare model
    gives, and DDP still trains afterwards (single-process gloo group)."""
    import datetime

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    questions = [q["question"] for q in world.test[:2]]
    config = greedy(max_turns=1, max_new_tokens=8)
    expected = [t.input_ids for t in rollout(random_qwen2(tokenizer), tokenizer, questions, NoRetriever(), config)]
    # a bounded timeout: a stuck rendezvous fails the test instead of hanging the suite
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    ddp = None
    try:
        ddp = DistributedDataParallel(random_qwen2(tokenizer)).train()
        assert [t.input_ids for t in rollout(ddp.module, tokenizer, questions, NoRetriever(), config)] == expected
        assert ddp.training and ddp.module.training
        ddp(input_ids=torch.tensor([expected[0]])).logits.mean().backward()
        assert ddp.module.lm_head.weight.grad is not None
    finally:
        # DDP (its reducer holds the group) goes before the group: freed after destroy_process_group, the
        # gloo group's destructor once hung joining its worker threads (seen in a CI run of this suite)
        del ddp
        dist.destroy_process_group()
