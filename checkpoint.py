"""Checkpoint directories that are never half-written, and resumes that never mix two runs.

What it does
- `save(target, write)`: `write(tmp)` fills a temporary directory beside `target`
  (`.{name}.saving`); a marker file is written last; then the new directory replaces the old one
  by renames. Whatever kills the process, at any instant, either the previous checkpoint or the new
  one is complete on disk, and `recover(target)` (called by `save` and before every resume) turns
  what it finds back into exactly one complete `target`. Entries of the old directory named in
  `carry` (a run's `metrics.jsonl`, its `best/` checkpoint) are moved into the new one, so a run
  directory can be a checkpoint and still hold them.
- `config_hash` / `config_differences`: what a trainer state records about the settings it was made
  with, and which of them a resume changes.
- `truncate_metrics`: a resumed run drops the metric lines written after its checkpoint's step, so
  no step is ever logged twice.

What it does not do: decide what goes into a checkpoint (train.py writes the model, tokenizer and
trainer state through `write`), or talk to other processes (train.py calls `save` on rank 0 only).

The swap, step by step (`target` = T, `.T.saving` = S, `.T.old` = O):
    1. write(S); S/CHECKPOINT_COMPLETE            a kill here: S is incomplete -> recover deletes it
    2. move each carried entry T/x -> S/x          a kill here: S complete -> recover finishes the swap
    3. rename T -> O                               a kill here: T missing, S complete -> likewise
    4. rename S -> T
    5. delete O                                    a kill here: recover deletes O

    checkpoint.save("runs/rl", lambda tmp: model.save_pretrained(tmp), carry=("metrics.jsonl", "best"))
    checkpoint.recover("runs/rl")        # before reading runs/rl after a crash
"""
import hashlib
import json
import os
import shutil

COMPLETE = "CHECKPOINT_COMPLETE"   # written last: a directory without it was never finished


def _siblings(target: str) -> tuple[str, str]:
    parent, name = os.path.split(os.path.abspath(target))
    return os.path.join(parent, f".{name}.saving"), os.path.join(parent, f".{name}.old")


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE))


def _carry(source: str, dest: str, names) -> None:
    """Moves the carried entries still in `source` into `dest` (renames, so nothing is copied)."""
    for name in names:
        if os.path.exists(os.path.join(source, name)) and not os.path.exists(os.path.join(dest, name)):
            os.rename(os.path.join(source, name), os.path.join(dest, name))


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    """Flushes every file and directory of the new checkpoint to disk before it is marked complete
    (a kill needs none of this; a power cut does)."""
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            _fsync(os.path.join(root, name))
        _fsync(root)


def recover(target: str, carry=("metrics.jsonl", "best")) -> None:
    """Finishes or rolls back a swap that a crash interrupted, so that `target` is one complete
    checkpoint again (or absent, if none was ever completed), and does the same for every carried
    entry that is itself a checkpoint (a run's best/, saved by its own swap inside the run directory).
    Safe to call at any time."""
    _recover_one(target, carry)
    for name in carry:
        nested = os.path.join(target, name)
        if any(os.path.isdir(p) for p in (nested, *_siblings(nested))):
            _recover_one(nested, ())


def _recover_one(target: str, carry) -> None:
    saving, old = _siblings(target)
    if os.path.isdir(saving):
        if is_complete(saving):                     # the new checkpoint is whole: finish its swap
            if os.path.isdir(target):
                _carry(target, saving, carry)
                if os.path.isdir(old):              # older still than target: nothing in it is needed
                    shutil.rmtree(old)
                os.rename(target, old)
            os.rename(saving, target)
        else:                                       # never finished: the old target is still intact
            shutil.rmtree(saving)
    if os.path.isdir(old):
        if not os.path.isdir(target):
            os.rename(old, target)
        else:
            _carry(old, target, carry)
            shutil.rmtree(old)


def save(target: str, write, carry=("metrics.jsonl", "best")) -> None:
    """Writes a checkpoint atomically: write(tmp_dir) fills a fresh directory, which then replaces
    `target` as described in the module docstring. `carry`: entries of the old target to keep."""
    recover(target, carry)
    saving, old = _siblings(target)
    if os.path.exists(saving):
        shutil.rmtree(saving)
    os.makedirs(saving)
    write(saving)
    _fsync_tree(saving)                           # the files reach the disk before the marker says so
    with open(os.path.join(saving, COMPLETE), "w") as f:
        f.write("this directory was written completely\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync(saving)
    if os.path.isdir(target):
        _carry(target, saving, carry)
        os.rename(target, old)
    os.rename(saving, target)
    _fsync(os.path.dirname(os.path.abspath(target)))   # the renames themselves
    shutil.rmtree(old, ignore_errors=True)


# -----------------------------------------------------------------------------------------------
# What a trainer state remembers about its settings


def config_hash(config: dict) -> str:
    """sha256 of the config as canonical JSON (sorted keys), 16 hex digits: equal iff the values are."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def config_differences(saved: dict, current: dict, free=()) -> dict:
    """{key: (saved value, current value)} for every setting that differs, except the `free` ones
    (logistics that do not change what is trained, e.g. how often to save)."""
    keys = sorted((set(saved) | set(current)) - set(free))
    return {k: (saved.get(k), current.get(k)) for k in keys if saved.get(k) != current.get(k)}


def truncate_metrics(path: str, step: int) -> int:
    """Keeps the metric lines of steps <= `step` (a resumed run writes the later ones again);
    rewritten atomically. Returns how many lines were dropped."""
    if not os.path.isfile(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) == len(lines):
        return 0
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)
    return len(lines) - len(kept)
