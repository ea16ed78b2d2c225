"""checkpoint.py: every state a killed save can leave is recovered into one complete checkpoint, the
newest complete one; settings differences and metric truncation by hand; a trainer's checkpoint
reloads with AutoModelForCausalLM, can be saved as bf16, and a full disk keeps the previous one."""
import json
import os

import pytest
import torch

import checkpoint
import ddp
import models


def write_version(version: str):
    def write(tmp):
        with open(os.path.join(tmp, "weights"), "w") as f:
            f.write(version)
    return write


def read(path, name="weights"):
    with open(os.path.join(path, name)) as f:
        return f.read()


@pytest.fixture
def run(tmp_path):
    """A run directory holding checkpoint v1, its live metrics and a best/ checkpoint."""
    target = str(tmp_path / "run")
    checkpoint.save(target, write_version("v1"))
    with open(os.path.join(target, "metrics.jsonl"), "w") as f:
        f.write('{"step": 1}\n')
    checkpoint.save(os.path.join(target, "best"), write_version("best"), carry=())
    return target


def listing(tmp_path):
    return sorted(os.listdir(tmp_path))


def test_save_replaces_the_checkpoint_and_carries_metrics_and_best(run, tmp_path):
    checkpoint.save(run, write_version("v2"))
    assert read(run) == "v2" and checkpoint.is_complete(run)
    assert read(run, "metrics.jsonl") == '{"step": 1}\n' and read(os.path.join(run, "best")) == "best"
    assert listing(tmp_path) == ["run"]                        # no .saving / .old left behind


def _interrupted(run, stop_after):
    """Replays save(run, v2) by hand up to a step of the module docstring's list."""
    saving, old = os.path.join(os.path.dirname(run), ".run.saving"), os.path.join(os.path.dirname(run), ".run.old")
    os.makedirs(saving)
    write_version("v2")(saving)
    if stop_after == "write":
        return
    open(os.path.join(saving, checkpoint.COMPLETE), "w").close()
    if stop_after == "complete":
        return
    os.rename(os.path.join(run, "metrics.jsonl"), os.path.join(saving, "metrics.jsonl"))   # half the carry
    if stop_after == "half_carry":
        return
    os.rename(os.path.join(run, "best"), os.path.join(saving, "best"))
    if stop_after == "carry":
        return
    os.rename(run, old)
    if stop_after == "old":
        return
    os.rename(saving, run)


@pytest.mark.parametrize("stop_after, version", [
    ("write", "v1"),          # never completed: the old checkpoint is the result
    ("complete", "v2"),       # complete: the swap is finished
    ("half_carry", "v2"),
    ("carry", "v2"),
    ("old", "v2"),            # the target was renamed away: the new one takes its place
    ("new", "v2"),            # only the old copy is left to delete
])
def test_recover_turns_every_interrupted_state_into_one_complete_checkpoint(run, tmp_path, stop_after, version):
    _interrupted(run, stop_after)
    checkpoint.recover(run)
    assert listing(tmp_path) == ["run"]
    assert read(run) == version and checkpoint.is_complete(run)
    assert read(run, "metrics.jsonl") == '{"step": 1}\n' and read(os.path.join(run, "best")) == "best"
    checkpoint.recover(run)                                  # idempotent
    assert read(run) == version


def test_a_failed_write_keeps_the_previous_checkpoint_and_gives_its_space_back_at_once(run, tmp_path):
    def broken(tmp):
        write_version("v2")(tmp)
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(run, broken)
    assert listing(tmp_path) == ["run"] and read(run) == "v1"     # no .run.saving left to fill the disk
    checkpoint.recover(run)
    assert read(run) == "v1" and listing(tmp_path) == ["run"]


def test_config_hash_and_differences_by_hand():
    a = {"lr": 1e-4, "group_size": 2, "save_every": 0}
    assert checkpoint.config_hash(a) == checkpoint.config_hash(dict(reversed(list(a.items()))))
    assert checkpoint.config_hash(a) != checkpoint.config_hash({**a, "lr": 1e-3})
    diff = checkpoint.config_differences(a, {"lr": 5e-2, "group_size": 2, "save_every": 10, "beta": 1.0},
                                         free=("save_every",))
    assert diff == {"lr": (1e-4, 5e-2), "beta": (None, 1.0)}


def test_truncate_metrics_drops_the_steps_after_the_checkpoint(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps({"step": s}) + "\n" for s in [0, 1, 2, 3, 4])
    assert checkpoint.truncate_metrics(path, 2) == 2
    assert [json.loads(line)["step"] for line in open(path)] == [0, 1, 2]
    assert checkpoint.truncate_metrics(str(tmp_path / "none.jsonl"), 5) == 0


def test_recover_also_repairs_an_interrupted_save_of_a_carried_best_checkpoint(run, tmp_path):
    """best/ is saved by its own swap inside the run directory: a kill after its old copy was renamed
    away leaves only run/.best.old and run/.best.saving; recovering the run repairs best/ too, and the
    run's next save carries it."""
    best = os.path.join(run, "best")
    os.makedirs(os.path.join(run, ".best.saving"))
    write_version("best2")(os.path.join(run, ".best.saving"))
    open(os.path.join(run, ".best.saving", checkpoint.COMPLETE), "w").close()
    os.rename(best, os.path.join(run, ".best.old"))
    checkpoint.recover(run)
    assert read(best) == "best2" and sorted(os.listdir(run)) == sorted([checkpoint.COMPLETE, "weights",
                                                                        "metrics.jsonl", "best"])
    checkpoint.save(run, write_version("v3"))
    assert read(best) == "best2" and read(run) == "v3"


# -----------------------------------------------------------------------------------------------
# The manifest, torn metric lines, the user's own files, input fingerprints


def test_the_marker_records_every_files_checksum_and_verify_names_the_file_that_changed(run, tmp_path):
    def write(tmp):
        write_version("v2")(tmp)
        os.makedirs(os.path.join(tmp, "critic"))
        with open(os.path.join(tmp, "critic", "weights"), "wb") as f:
            f.write(bytes(range(256)) * 100)
    checkpoint.save(run, write)
    files = checkpoint.manifest(run)
    assert sorted(files) == ["critic/weights", "weights"] and files["weights"]["bytes"] == 2
    checkpoint.verify(run)                                       # untouched: nothing to say
    with open(os.path.join(run, "critic", "weights"), "r+b") as f:   # 200 flipped bytes, same size
        f.seek(1000)
        f.write(bytes(255 - b for b in f.read(200)[::-1]))
    with pytest.raises(ValueError, match=r"critic/weights: corrupted, its checksum differs"):
        checkpoint.verify(run)
    checkpoint.verify(run, which=lambda rel: rel == "weights")   # the other files can be checked alone
    os.remove(os.path.join(run, "weights"))
    with pytest.raises(ValueError, match=r"weights: missing"):
        checkpoint.verify(run, which=lambda rel: rel == "weights")


def test_a_checkpoint_of_an_older_version_without_checksums_loads_with_a_warning(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / checkpoint.COMPLETE).write_text("this directory was written completely\n")
    with pytest.warns(UserWarning, match="without checksums"):
        checkpoint.verify(str(old))


def test_save_keeps_the_entries_the_old_checkpoint_did_not_write(run, tmp_path):
    """A user's notes in a run directory survive the run's next save (and its interrupted swaps);
    the old checkpoint's own files do not."""
    with open(os.path.join(run, "notes.txt"), "w") as f:
        f.write("precious")
    with open(os.path.join(run, "old-only"), "w") as f:          # pretend v1 wrote it: in its manifest
        f.write("x")
    checkpoint.save(run, write_version("v1.5"))                  # the manifest now lists "weights" only
    assert read(run, "notes.txt") == "precious" and read(run, "old-only") == "x"   # not v1's: kept
    assert checkpoint.foreign_entries(run) == ["best", "metrics.jsonl", "notes.txt", "old-only"]
    _interrupted(run, "old")                                     # a crash in the middle of the next swap
    checkpoint.recover(run)
    assert read(run) == "v2" and read(run, "notes.txt") == "precious"


def test_a_torn_last_metrics_line_is_dropped_with_a_warning_and_any_other_bad_line_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')      # a full disk in mid-append
    with pytest.warns(UserWarning, match="torn last line"):
        assert checkpoint.truncate_metrics(str(path), 2) == 1
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    path.write_text('{"step": 1}\n{"st\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON line, and not the last one"):
        checkpoint.truncate_metrics(str(path), 2)


def test_fingerprint_follows_the_content_not_the_location(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_bytes(b"x" * (3 << 20))                                  # 3 MiB: the middle MiB is not hashed
    fp = checkpoint.fingerprint(str(a), rows=7)
    assert fp["bytes"] == 3 << 20 and fp["rows"] == 7 and fp["path"] == str(a)
    moved = tmp_path / "sub" / "a.jsonl"
    moved.parent.mkdir()
    a.rename(moved)
    assert checkpoint.input_differences({"--data": fp}, {"--data": checkpoint.fingerprint(str(moved), rows=7)}) == {}
    with open(moved, "r+b") as f:                                  # the last byte changes
        f.seek(-1, 2)
        f.write(b"y")
    assert list(checkpoint.input_differences({"--data": fp}, {"--data": checkpoint.fingerprint(str(moved), 7)})) == \
        ["--data"]
    assert list(checkpoint.input_differences({"--data": fp}, {})) == ["--data"]       # an input dropped
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / ".hidden").write_text("not part of it")
    assert list(checkpoint.fingerprint(str(model))["files"]) == ["config.json"]


def test_checkpoint_reloads_with_automodel_and_gives_the_same_logits(tokenizer, model_dirs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    dist = ddp.Dist()
    model = models.load_model(model_dirs["student"], dist, trainable=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))          # not the initial weights
    checkpoint.save_checkpoint(str(tmp_path / "ckpt"), model, tokenizer, dist, {"step": 7})
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ckpt")).eval()
    ids = torch.tensor([tokenizer("<think> a test </think>")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(str(tmp_path / "ckpt")).get_vocab() == tokenizer.get_vocab()
    assert torch.load(tmp_path / "ckpt" / "trainer_state.pt", weights_only=False)["step"] == 7


def test_save_dtype_bfloat16_writes_bf16_weights_and_says_so(tokenizer, model_dirs, tmp_path):
    from transformers import AutoModelForCausalLM
    model = models.load_model(model_dirs["student"], ddp.Dist(), trainable=True)
    checkpoint.save_checkpoint(str(tmp_path / "bf16"), model, tokenizer, ddp.Dist(), {"step": 1, "config": {}},
                               save_dtype="bfloat16")
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16"), dtype="auto")
    assert loaded.dtype == torch.bfloat16 and model.dtype == torch.float32       # the trained copy is untouched
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.to(torch.bfloat16)), k
    assert json.loads((tmp_path / "bf16" / "train_config.json").read_text())["save_dtype"] == "bfloat16"


def test_a_full_disk_during_a_save_names_the_checkpoint_and_keeps_the_previous_one(model_dirs, tokenizer, tmp_path):
    import resource
    dist = ddp.Dist()
    model = models.load_model(model_dirs["student"], dist, trainable=True)
    out = str(tmp_path / "ckpt")
    checkpoint.save_checkpoint(out, model, tokenizer, dist, {"step": 1, "config": {}})
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))   # files may not grow past 200 kB: "disk full"
    try:
        with pytest.raises(OSError, match=r"cannot write checkpoint .*ckpt \((model files|trainer_state.pt)\): .*"
                                          "the previous checkpoint there, if any, is unchanged"):
            checkpoint.save_checkpoint(out, model, tokenizer, dist, {"step": 2, "config": {}, "big": torch.zeros(10**6)})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert torch.load(os.path.join(out, "trainer_state.pt"), weights_only=False)["step"] == 1
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]                  # the half-written copy is gone
    checkpoint.verify(out)


def write_state(step: int):
    """A checkpoint writer of a resumable run: a trainer state and the readable config with its step."""
    def write(tmp):
        open(os.path.join(tmp, checkpoint.STATE_FILE), "w").close()
        with open(os.path.join(tmp, checkpoint.CONFIG_FILE), "w") as f:
            json.dump({"step": step}, f)
    return write


def test_resumable_step_is_the_step_a_resume_continues_from_even_after_an_interrupted_save(tmp_path):
    target = str(tmp_path / "run")
    assert checkpoint.resumable_step(target) is None                       # no directory
    checkpoint.save(target, write_version("weights only"))
    assert checkpoint.resumable_step(target) is None                       # a checkpoint with no trainer state
    checkpoint.save(target, write_state(25))
    assert checkpoint.resumable_step(target) == 25
    saving, old = str(tmp_path / ".run.saving"), str(tmp_path / ".run.old")
    os.makedirs(saving)                                                    # save(step 40) killed between renames
    write_state(40)(saving)
    open(os.path.join(saving, checkpoint.COMPLETE), "w").close()
    os.rename(target, old)
    assert checkpoint.resumable_step(target) == 40 and listing(tmp_path) == ["run"]
