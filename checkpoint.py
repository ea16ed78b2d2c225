"""Checkpoint directories that are never half-written, and resumes that never mix two runs.

What it does
- `save(target, write)`: `write(tmp)` fills a temporary directory beside `target`
  (`.{name}.saving`); a marker file is written last; then the new directory replaces the old one
  by renames. Whatever kills the process, at any instant, either the previous checkpoint or the new
  one is complete on disk, and `recover(target)` (called by `save` and before every resume) turns
  what it finds back into exactly one complete `target`. Entries of the old directory named in
  `carry` (a run's `metrics.jsonl`, its `best/` checkpoint) are moved into the new one, so a run
  directory can be a checkpoint and still hold them; so is every entry the old checkpoint did not
  write itself (a user's notes in a run directory survive its next save).
- The marker is a manifest: the SHA-256 and size of every file the checkpoint wrote. `verify(path)`
  recomputes them and names the first file that differs (a flipped bit, a truncated copy): a
  torch.load of a damaged trainer_state.pt or a damaged safetensors file can succeed silently.
- `config_hash` / `config_differences`: what a trainer state records about the settings it was made
  with, and which of them a resume changes.
- `truncate_metrics`: a resumed run drops the metric lines written after its checkpoint's step, so
  no step is ever logged twice, and a torn last line (what a crash or a full disk leaves mid-append).
- `fingerprint`: what identifies an input file or directory cheaply (size, a hash of its first and
  last MiB), so a resume can refuse another --data or --teacher than the run was started with.

What it does not do: decide what goes into a checkpoint (train.py writes the model, tokenizer and
trainer state through `write`), or talk to other processes (train.py calls `save` on rank 0 only).

The swap, step by step (`target` = T, `.T.saving` = S, `.T.old` = O):
    1. write(S); S/CHECKPOINT_COMPLETE            a kill here: S is incomplete -> recover deletes it
       (the manifest is written to a temporary name and renamed: it exists only whole)
    2. move each carried entry T/x -> S/x          a kill here: S complete -> recover finishes the swap
    3. rename T -> O                               a kill here: T missing, S complete -> likewise
    4. rename S -> T
    5. delete O                                    a kill here: recover deletes O

    checkpoint.save("runs/rl", lambda tmp: model.save_pretrained(tmp), carry=("metrics.jsonl", "best"))
    checkpoint.recover("runs/rl")        # before reading runs/rl after a crash
    checkpoint.verify("runs/rl")         # ValueError naming the file whose checksum differs
"""
import hashlib
import json
import os
import shutil
import warnings

COMPLETE = "CHECKPOINT_COMPLETE"   # written last: a directory without it was never finished
MANIFEST_FORMAT = 1                # the marker's JSON: {"format": 1, "files": {relative path: {sha256, bytes}}}


def _siblings(target: str) -> tuple[str, str]:
    parent, name = os.path.split(os.path.abspath(target))
    return os.path.join(parent, f".{name}.saving"), os.path.join(parent, f".{name}.old")


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE))


def _carry(source: str, dest: str, names) -> None:
    """Moves the carried entries still in `source` into `dest` (renames, so nothing is copied)."""
    for name in list(names) + foreign_entries(source):
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
    try:
        write(saving)
        _fsync_tree(saving)                       # the files reach the disk before the marker says so
        _write_manifest(saving)
    except BaseException:                         # e.g. a full disk: give its space back, keep the old target
        shutil.rmtree(saving, ignore_errors=True)
        raise
    _fsync(saving)
    if os.path.isdir(target):
        _carry(target, saving, carry)
        os.rename(target, old)
    os.rename(saving, target)
    _fsync(os.path.dirname(os.path.abspath(target)))   # the renames themselves
    shutil.rmtree(old, ignore_errors=True)


# -----------------------------------------------------------------------------------------------
# The manifest: what the checkpoint wrote, with checksums


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(path: str) -> list[str]:
    """Every file under `path`, as sorted relative paths with "/" separators."""
    found = []
    for root, _, files in os.walk(path):
        for name in files:
            found.append(os.path.relpath(os.path.join(root, name), path).replace(os.sep, "/"))
    return sorted(found)


def _write_manifest(saving: str) -> None:
    """The completion marker: the checksum and size of every file written, to a temporary name first
    and then renamed, so the marker exists only whole."""
    files = {rel: {"sha256": _sha256(os.path.join(saving, rel)), "bytes": os.path.getsize(os.path.join(saving, rel))}
             for rel in _files(saving)}
    tmp = os.path.join(saving, COMPLETE + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"format": MANIFEST_FORMAT, "files": files}, f, indent=0, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(saving, COMPLETE))


def manifest(path: str) -> dict | None:
    """{relative path: {"sha256", "bytes"}} of a checkpoint's files, or None for a directory with no
    manifest (not a checkpoint, or one written before checksums were recorded)."""
    marker = os.path.join(path, COMPLETE)
    if not os.path.isfile(marker):
        return None
    try:
        with open(marker) as f:
            content = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):     # the plain-text marker of older versions
        return None
    if not isinstance(content, dict) or content.get("format") != MANIFEST_FORMAT:
        return None
    return content["files"]


def foreign_entries(path: str) -> list[str]:
    """The entries of `path` its checkpoint did not write: all of them when it holds no checkpoint,
    none when it holds one of an older version (without a manifest, nothing can be told apart)."""
    if not os.path.isdir(path):
        return []
    if not os.path.exists(os.path.join(path, COMPLETE)):
        return sorted(os.listdir(path))
    files = manifest(path)
    if files is None:
        return []
    own = {rel.split("/")[0] for rel in files} | {COMPLETE}
    return sorted(name for name in os.listdir(path) if name not in own)


def own_entries(path: str) -> list[str]:
    """The entries of `path` its checkpoint wrote (the manifest's top-level names and the marker)."""
    files = manifest(path) or {}
    own = {rel.split("/")[0] for rel in files} | {COMPLETE}
    return sorted(name for name in os.listdir(path) if name in own) if os.path.isdir(path) else []


def verify(path: str, which=None) -> None:
    """Recomputes the checksum of every file the manifest lists (those for which which(relative path)
    is true, if given) and raises ValueError naming the first that is missing or differs. A
    checkpoint without a manifest (an older version) is accepted with a warning."""
    files = manifest(path)
    if files is None:
        if os.path.exists(os.path.join(path, COMPLETE)):
            warnings.warn(f"{path}: a checkpoint without checksums (written by an older version); its files "
                          "are not verified")
        return
    for rel, expected in sorted(files.items()):
        if which is not None and not which(rel):
            continue
        full = os.path.join(path, *rel.split("/"))
        if not os.path.isfile(full):
            raise ValueError(f"{full}: missing; the checkpoint {path} lists it (it was deleted after the save)")
        size = os.path.getsize(full)
        if size != expected["bytes"] or _sha256(full) != expected["sha256"]:
            raise ValueError(f"{full}: corrupted, its checksum differs from the one recorded when the checkpoint "
                             f"was saved ({size} bytes now, {expected['bytes']} then); restore it from a copy or use "
                             "an earlier checkpoint")


# -----------------------------------------------------------------------------------------------
# What a trainer state remembers about its settings and inputs


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
    rewritten atomically. A last line that is not JSON is dropped with a warning: it is what a crash
    or a full disk leaves in the middle of an append. Any other bad line is an error naming it.
    Returns how many lines were dropped."""
    if not os.path.isfile(path):
        return 0
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [line for line in f if line.strip()]
    total, rows = len(lines), []
    for n, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n < len(lines):
                raise ValueError(f"{path}:{n}: not a JSON line, and not the last one (a torn last line is "
                                 "dropped on resume; this is something else); repair or remove it") from None
            warnings.warn(f"{path}: dropped its torn last line ({line.strip()[:60]!r}…), what a crash or a full "
                          "disk leaves in the middle of an append")
            lines = lines[:-1]
    kept = [line for line, row in zip(lines, rows) if row.get("step", 0) <= step]
    if len(kept) == total:
        return 0
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)
    return total - len(kept)


def fingerprint(path: str, rows: int | None = None) -> dict:
    """What identifies an input without reading all of it: its absolute path, size, the SHA-256 of
    its first and last MiB (16 hex digits), and for a data file its row count. A directory (a
    model) is the fingerprint of each file directly in it (not its subdirectories or dot-files).
    The same file edited, or another file in its place, gets another fingerprint in all but contrived
    cases, which is what a resume needs to refuse inputs it was not started with."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if not n.startswith(".") and os.path.isfile(os.path.join(path, n)))
        return {"path": path, "files": {n: _head_tail(os.path.join(path, n)) for n in names}}
    out = {"path": path, **_head_tail(path)}
    if rows is not None:
        out["rows"] = rows
    return out


def _head_tail(path: str) -> dict:
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        if size > 1 << 20:
            f.seek(max(1 << 20, size - (1 << 20)))
            digest.update(f.read())
    return {"bytes": size, "head_tail_sha256": digest.hexdigest()[:16]}


def input_differences(saved: dict, current: dict) -> dict:
    """{argument: (saved fingerprint, current one)} for every input whose content differs; where a
    file lies (its path) is not compared, so a run directory and its data can move together."""
    def content(fp):
        return None if fp is None else {k: v for k, v in fp.items() if k != "path"}
    keys = sorted(set(saved) | set(current))
    return {k: (saved.get(k), current.get(k)) for k in keys if content(saved.get(k)) != content(current.get(k))}
