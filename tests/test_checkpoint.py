"""checkpoint.py: every state a killed save can leave is recovered into one complete checkpoint, the
newest complete one; settings differences and metric truncation by hand."""
import json
import os

import pytest

import checkpoint


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


def test_a_failed_write_keeps_the_previous_checkpoint(run, tmp_path):
    def broken(tmp):
        write_version("v2")(tmp)
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(run, broken)
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
