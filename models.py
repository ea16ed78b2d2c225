"""Models and the one forward every loss uses: loading, checks, batches and HeadAtPositions.

What it does: loads a Hugging Face causal LM or tokenizer from a local directory or a Hub id with
errors naming the command-line argument (a damaged checkpoint, missing weights, non-finite weights
are refused); checks that a student and a teacher share a tokenizer; turns trajectory records into a
`Batch` (token ids and their loss positions, shifted once here); and computes logits only at those
positions (`HeadAtPositions`, `logits_of`), the view a trainer wraps in DDP (`wrap`).

What it does not do: define a loss (dgpo.py), train (sft.py, rl.py), generate (rollout.py) or save
(checkpoint.py).

    import ddp, models
    dist = ddp.setup()
    model = models.load_model("runs/kd", dist, trainable=True)
    tokenizer = models.load_tokenizer("runs/kd")
    batch = models.make_batch(records, dist.device)            # records: input_ids + loss_mask
    logits = models.logits_of(model, batch)                    # (B, L, V) at the loss positions only
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import checkpoint
import data
import ddp


def pretrained(loader, path: str, arg: str, **kwargs):
    """`loader.from_pretrained(path)` for a local directory or a Hub id, with one clear error naming
    the command-line argument when it is neither (a missing path, a Hub id offline and not cached)."""
    if not os.path.isdir(path) and (os.path.exists(path) or path.count("/") > 1 or path.startswith((".", "~"))):
        raise FileNotFoundError(f"{arg} {path}: not a model directory (and not a Hub id of the form org/name)")
    try:
        return loader.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:
        if os.path.isdir(path):
            raise
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FileNotFoundError(f"{arg} {path}: neither a local model directory nor a Hub id that can be "
                                f"loaded here (offline and not cached?): {first_line}") from None


# what a local model directory must hold: transformers' own messages for a missing piece are a
# 1-token tokenizer or "cannot reshape a tensor of 0 elements" much later
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.tiktoken", "qwen.tiktoken")


def check_model_dir(path: str, arg: str, needs: str) -> None:
    """A local directory (not a Hub id) holds what `needs` ("model" or "tokenizer") loads from; and a
    checkpoint of this project has the checksums its files were saved with (checkpoint.verify; the
    trainer state is verified where it is read)."""
    if not os.path.isdir(path):
        return
    names = set(os.listdir(path))
    if needs == "model":
        if "config.json" not in names:
            raise FileNotFoundError(f"{arg} {path}: not a model directory: it has no config.json")
        if not names & set(WEIGHT_FILES):
            raise FileNotFoundError(f"{arg} {path}: no weights in it (none of {', '.join(WEIGHT_FILES)})")
        checkpoint.verify(path, which=lambda rel: rel != checkpoint.STATE_FILE)
    elif not names & set(TOKENIZER_FILES):
        raise FileNotFoundError(f"{arg} {path}: no tokenizer in it (none of {', '.join(TOKENIZER_FILES)}); "
                                "save the tokenizer beside the model (tokenizer.save_pretrained)")


def load_model(path: str, dist: ddp.Dist, trainable: bool, grad_checkpointing: bool = False, arg: str = "--model"):
    """An HF causal LM from a local directory or a Hub id: fp32 weights when trained (AdamW state in
    fp32; bf16 comes from autocast), bf16 when frozen on GPU (the teacher), fp32 on CPU. A checkpoint
    whose files differ from their recorded checksums, a directory without config or weights, weights
    that cannot be read (named) and a model with a non-finite weight are refused."""
    from transformers import AutoModelForCausalLM
    dtype = torch.float32 if trainable or dist.device.type != "cuda" else torch.bfloat16
    check_model_dir(path, arg, "model")
    try:
        model = pretrained(AutoModelForCausalLM, path, arg, dtype=dtype)
    except Exception as error:
        if not os.path.isdir(path) or isinstance(error, MemoryError):
            raise
        weights = sorted(set(os.listdir(path)) & set(WEIGHT_FILES)) + \
            sorted(n for n in os.listdir(path) if n.endswith((".safetensors", ".bin")) and n not in WEIGHT_FILES)
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"{arg} {path}: cannot load the model from {', '.join(weights)} "
                         f"({type(error).__name__}: {first_line}); the files are damaged or not this "
                         "architecture's") from None
    model = model.to(dist.device)
    bad = checkpoint.first_non_finite(model)
    if bad is not None:
        raise ValueError(f"{arg} {path}: weight {bad} holds NaN or inf values; refusing to use this model")
    if grad_checkpointing:
        enable_checkpointing(model)
    if not trainable:
        model.eval().requires_grad_(False)
    return model


def enable_checkpointing(model) -> None:
    """Activation (gradient) checkpointing of every decoder layer, non-reentrant; it acts only while
    the model is in training mode."""
    if hasattr(model, "activation_checkpointing_enable"):        # the transformers 5 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load_tokenizer(path: str, arg: str = "--model"):
    """The tokenizer of a model directory or Hub id; a directory without tokenizer files, or one whose
    files make a tokenizer of fewer than 2 tokens, is refused naming it."""
    from transformers import AutoTokenizer
    check_model_dir(path, arg, "tokenizer")
    tokenizer = pretrained(AutoTokenizer, path, arg)
    if len(tokenizer) < 2:
        raise ValueError(f"{arg} {path}: its tokenizer files make a tokenizer of {len(tokenizer)} token(s); "
                         "they are damaged or incomplete")
    if tokenizer.pad_token_id is None:          # only used as filler; masks are always explicit
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_same_tokenizer(student_tok, teacher_tok, student_dir: str, teacher_dir: str) -> None:
    """Distillation compares distributions token by token: the same ids for the same strings and the
    same vocabulary size (eos and pad ids may differ: data.tokenizer_differences)."""
    differences = data.tokenizer_differences(student_tok, teacher_tok)
    if differences:
        raise ValueError(f"the tokenizers of {student_dir} and {teacher_dir} differ ({'; '.join(differences)}): "
                         "KD and the teacher KL need the same ids for the same strings")


def vocab_size_of(tokenizer, *models) -> int:
    """The tokenizer's length; model embeddings may only be larger (padding rows, as in Qwen2.5)."""
    n = len(tokenizer)
    for m in models:
        rows = m.get_output_embeddings().weight.shape[0]
        if rows < n:
            raise ValueError(f"model has {rows} output rows but the tokenizer has {n} tokens")
    return n


# -----------------------------------------------------------------------------
# Batches: token ids and explicit masks, shifted once here


@dataclass
class Batch:
    """A micro-batch with its loss positions gathered. Only tokens the policy sampled carry a loss
    (17.5% of the demo's positions, a similar share with Search-R1's observations), so the LM head
    runs on those positions only: row b's n_b loss positions are packed to the left of an (B, L)
    layout, L = max_b n_b, in sequence order."""
    inputs: torch.Tensor      # (B, T)  ids fed to the model: sequence[:-1], right-padded
    positions: torch.Tensor   # (B, L)  input position whose NEXT token is a loss token (0 in the padding)
    targets: torch.Tensor     # (B, L)  that next token, as the policy sampled it
    mask: torch.Tensor        # (B, L)  bool, True on the packed entries (row b: the first n_b)


def make_batch(records: list[dict], device, pad_id: int = 0) -> Batch:
    """Right-pads `input_ids` of trajectory records and gathers the positions their `loss_mask`
    marks. Right padding with a causal model means no real token ever attends to padding, so the
    forward needs no attention mask; the pad id is irrelevant because positions and the mask are
    carried explicitly."""
    width = max(len(r["input_ids"]) for r in records) - 1
    picked = [[t for t, m in enumerate(r["loss_mask"][1:]) if m] for r in records]   # per row, ascending
    packed = max(1, max(len(p) for p in picked))
    inputs = torch.full((len(records), width), pad_id, dtype=torch.long)
    positions = torch.zeros(len(records), packed, dtype=torch.long)
    targets = torch.full((len(records), packed), pad_id, dtype=torch.long)
    mask = torch.zeros(len(records), packed, dtype=torch.bool)
    for b, (r, rows) in enumerate(zip(records, picked)):
        ids = r["input_ids"]
        inputs[b, :len(ids) - 1] = torch.tensor(ids[:-1])
        positions[b, :len(rows)] = torch.tensor(rows, dtype=torch.long)
        targets[b, :len(rows)] = torch.tensor([ids[t + 1] for t in rows], dtype=torch.long)
        mask[b, :len(rows)] = True
    return Batch(inputs.to(device), positions.to(device), targets.to(device), mask.to(device))


def padded(rows: list[torch.Tensor], shape: tuple[int, int], device) -> torch.Tensor:
    """Per-record values at the record's loss positions (old log-probs, per-token advantages), (n_i,)
    each, as one (B, L) tensor aligned with Batch.targets; the padding is 0 and lies outside the mask."""
    out = torch.zeros(shape, dtype=torch.float32, device=device)                 # (B, L)
    for b, row in enumerate(rows):
        out[b, :len(row)] = row.to(device)
    return out


class HeadAtPositions(torch.nn.Module):
    """A causal LM whose forward runs the decoder on the whole sequence but its head only on the
    hidden states at the given positions: logits (B, L, V) instead of (B, T, V). At Qwen2.5's
    vocabulary (151,936) that is the difference between 2.5 GB and ~0.4 GB of fp32 logits per
    4 × 1,024-token micro-batch (bench/bench_dgpo.py measures it). The same module serves a critic
    (a token-classification model with one label): its head is the one-unit `score` layer.

    It is the module DDP wraps (so gradients are all-reduced as usual) and holds no parameters of its
    own; `.lm` is the HF model that is saved. check() compares it once with the model's own forward,
    so a model whose forward does more than head(hidden) (logit scaling, soft-capping) is refused."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.head = lm.get_output_embeddings() if hasattr(lm, "lm_head") else getattr(lm, "score", None)
        if self.head is None:
            raise ValueError(f"{type(lm).__name__}: no LM head (lm_head) or value head (score) to apply")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.lm.base_model(input_ids=input_ids, use_cache=False).last_hidden_state     # (B, T, H)
        picked = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))        # (B, L, H)
        return self.head(picked)                                                                # (B, L, V)

    @torch.no_grad()
    def check(self) -> "HeadAtPositions":
        ids = torch.arange(1, 9, device=self.head.weight.device)[None] % self.head.weight.shape[0]  # (1, 8)
        positions = torch.tensor([[1, 4, 7]], device=ids.device)
        full = self.lm(input_ids=ids, use_cache=False).logits[:, [1, 4, 7]].float()
        ours = self.forward(ids, positions).float()
        # fp32 agrees to rounding; bf16/fp16 may pick other kernels for 8 rows than for 3. Either way the
        # differences this looks for (a logit scale, a soft cap) are far larger.
        tol = 1e-4 if self.head.weight.dtype == torch.float32 else 5e-2
        scale = max(1.0, full[torch.isfinite(full)].abs().max().item()) if torch.isfinite(full).any() else 1.0
        if not torch.allclose(full, ours, rtol=tol, atol=tol * scale, equal_nan=True):
            raise ValueError(f"{type(self.lm).__name__}: its forward is not head(decoder(ids)); this trainer "
                             "computes logits only at loss positions and cannot train it as is")
        return self


def at_positions(model) -> HeadAtPositions:
    """The head-at-positions view of an HF model, or the view itself (possibly DDP-wrapped). The
    trainers make their views once, checked (HeadAtPositions(model).check()); this makes an
    unchecked one for a bare model (a held-out loss, a benchmark)."""
    if isinstance(model, DDP) and not isinstance(model.module, HeadAtPositions):
        raise TypeError("wrap HeadAtPositions(model) in DDP, not the bare model: DDP must see the forward "
                        "that computes the loss")
    return model if isinstance(model, (HeadAtPositions, DDP)) else HeadAtPositions(model)


def wrap(model, dist: ddp.Dist):
    """The view a trainer computes its losses through: HeadAtPositions, checked, in DDP when distributed."""
    view = HeadAtPositions(model).check()
    if not dist.enabled:
        return view
    return DDP(view, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)


def hf_model(model):
    """The Hugging Face model inside a DDP wrapper and/or a HeadAtPositions view."""
    model = model.module if isinstance(model, DDP) else model
    return model.lm if isinstance(model, HeadAtPositions) else model


def logits_of(model, batch: Batch) -> torch.Tensor:
    """Logits at the batch's loss positions, (B, L, V): the one forward every loss uses (SFT, KD,
    and every RL forward: policy, old policy, teacher)."""
    return at_positions(model)(batch.inputs, batch.positions)                 # (B, L, V)


def micro_batches(records: list[dict], size: int) -> list[list[dict]]:
    """Consecutive chunks of `size`; sorted by length first so each chunk pads little."""
    records = sorted(records, key=lambda r: len(r["input_ids"]))
    return [records[i:i + size] for i in range(0, len(records), size)]


def loss_token_count(records: list[dict]) -> int:
    """The loss tokens of these records: targets the policy sampled, i.e. loss_mask[1:] (Batch.mask's entries)."""
    return sum(sum(r["loss_mask"][1:]) for r in records)


def global_token_count(dist: ddp.Dist, records: list[dict]) -> float:
    """Σ over ranks of the loss tokens — the normaliser every rank uses."""
    return ddp.all_reduce_sum(dist, [loss_token_count(records)])[0]
