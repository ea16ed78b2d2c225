"""models.py: a batch shifts once and packs its loss positions with an explicit mask; the head at
those positions gives the full forward's logits, losses and gradients; models and tokenizers that
cannot be trained as they are (another tokenizer, a forward that is more than its head, a directory
missing its tokenizer or config) are refused, naming what is wrong."""
import os
import shutil
from types import SimpleNamespace

import pytest
import torch

import data
import ddp
import demo
import dgpo
import models



def test_teacher_and_student_tokenizers_must_match(world, tokenizer, model_dirs, tmp_path):
    other_tok = demo.train_tokenizer(world, vocab_size=1024)
    other = str(tmp_path / "other")
    demo.make_tiny_model(other_tok, "test", out_dir=other)
    with pytest.raises(ValueError, match="tokenizers of .* differ"):
        models.check_same_tokenizer(tokenizer, models.load_tokenizer(other), model_dirs["student"], other)


def test_make_batch_shifts_once_and_packs_the_loss_positions_with_an_explicit_mask():
    records = [{"input_ids": [5, 6, 7, 8, 4, 3], "loss_mask": [0, 0, 1, 0, 1, 1]},   # an observation at 8
               {"input_ids": [9, 10], "loss_mask": [0, 1]}]
    batch = models.make_batch(records, "cpu", pad_id=9)    # pad id equal to a real token: masks decide
    assert batch.inputs.tolist() == [[5, 6, 7, 8, 4], [9, 9, 9, 9, 9]]
    assert batch.positions.tolist() == [[1, 3, 4], [0, 0, 0]]   # input position t predicts token t + 1
    assert batch.targets.tolist() == [[7, 4, 3], [10, 9, 9]]
    assert batch.mask.tolist() == [[True, True, True], [True, False, False]]


def _qwen2(tokenizer, tied: bool, extra_rows: int, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    config = Qwen2Config(vocab_size=len(tokenizer) + extra_rows, tie_word_embeddings=tied, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **demo.MODEL_SIZES["test"])
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).train()


def _full_path_batch(records):
    """Today's-path tensors: every position's target and a (B, T) mask, as before the head gather."""
    width = max(len(r["input_ids"]) for r in records) - 1
    inputs, targets = torch.zeros(len(records), width, dtype=torch.long), torch.zeros(len(records), width, dtype=torch.long)
    mask = torch.zeros(len(records), width, dtype=torch.bool)
    for b, r in enumerate(records):
        n = len(r["input_ids"]) - 1
        inputs[b, :n], targets[b, :n] = torch.tensor(r["input_ids"][:-1]), torch.tensor(r["input_ids"][1:])
        mask[b, :n] = torch.tensor(r["loss_mask"][1:], dtype=torch.bool)
    return inputs, targets, mask


@pytest.mark.parametrize("tied, extra_rows", [(True, 0), (False, 0), (False, 40)])
def test_head_at_loss_positions_gives_the_full_logits_losses_and_gradients(tokenizer, fixed_rollouts, tied,
                                                                           extra_rows):
    """KD loss and DGPO loss (exact teacher KL) through HeadAtPositions equal the same losses on the
    full (B, T, V) logits with a (B, T) mask, and so do every parameter's gradients, to 1e-6 in fp32 —
    tied and untied embeddings, and an embedding padded past the tokenizer (sliced off)."""
    records = data.load_trajectories(fixed_rollouts)[:6]
    vocab = len(tokenizer)
    student, teacher = _qwen2(tokenizer, tied, extra_rows, 1), _qwen2(tokenizer, tied, extra_rows, 2).eval()
    inputs, targets, mask = _full_path_batch(records)
    batch = models.make_batch(records, "cpu")
    assert batch.mask.sum() == mask.sum() and batch.mask.shape[1] < mask.shape[1]
    em = torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    adv = torch.tensor([0.5, -1.0, 0.25, 0.0, 1.0, -0.5])

    def losses(logits, teacher_logits, tokens, m):
        kd, _ = dgpo.kd_loss(logits, teacher_logits, tokens, m, vocab_size=vocab)
        lp = dgpo.token_logprobs(logits[..., :vocab], tokens)
        rl, _ = dgpo.dgpo_loss(lp, lp.detach(), adv, em, m, beta=0.5, student_logits=logits[..., :vocab],
                               teacher_logits=teacher_logits[..., :vocab])
        return kd, rl

    def grads(loss):
        student.zero_grad()
        loss.backward(retain_graph=True)
        return {k: p.grad.clone() for k, p in student.named_parameters()}

    view, teacher_view = models.HeadAtPositions(student).check(), models.HeadAtPositions(teacher).check()
    with torch.no_grad():
        t_full, t_packed = teacher(input_ids=inputs).logits, models.logits_of(teacher_view, batch)
    ours = losses(models.logits_of(view, batch), t_packed, batch.targets, batch.mask)
    full = losses(student(input_ids=inputs).logits, t_full, targets, mask)
    for a, b in zip(ours, full):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        ga, gb = grads(a), grads(b)
        for k in ga:
            torch.testing.assert_close(ga[k], gb[k], rtol=1e-6, atol=1e-6, msg=k)


def test_a_model_whose_forward_is_more_than_its_head_is_refused(tokenizer):
    model = _qwen2(tokenizer, True, 0, 1)
    model.forward = lambda *a, **k: SimpleNamespace(logits=type(model).forward(model, *a, **k).logits * 2)
    with pytest.raises(ValueError, match="forward is not head"):
        models.HeadAtPositions(model).check()


def test_a_model_directory_without_its_tokenizer_or_config_is_named_with_what_is_missing(model_dirs, tmp_path):
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(model_dirs["student"], no_tokenizer)
    for name in os.listdir(no_tokenizer):
        if name.startswith("tokenizer"):
            os.remove(no_tokenizer / name)
    with pytest.raises(FileNotFoundError, match=r"--student .*no-tokenizer: no tokenizer in it \(none of tokenizer.json"):
        models.load_tokenizer(str(no_tokenizer), "--student")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"--teacher .*empty: not a model directory: it has no config.json"):
        models.load_model(str(empty), ddp.Dist(), trainable=False, arg="--teacher")
    with pytest.raises(FileNotFoundError, match=r"--teacher .*empty: no tokenizer in it"):
        models.load_tokenizer(str(empty), "--teacher")
    weightless = tmp_path / "weightless"
    shutil.copytree(model_dirs["student"], weightless)
    os.remove(weightless / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"weightless: no weights in it \(none of model.safetensors"):
        models.load_model(str(weightless), ddp.Dist(), trainable=False)
