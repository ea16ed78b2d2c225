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

- A trainer's checkpoint on top of that core: `save_checkpoint` writes an HF model directory
  (model + tokenizer), `trainer_state.pt` (optimizer, scheduler, step, counters, every rank's RNG
  states) and `train_config.json`, through `save` on rank 0; `load_trainer_state` reads it back for
  an exact resume, refusing another stage, other settings (except FREE_SETTINGS) or other inputs;
  `recover_resume` runs before anything reads a --resume directory.
- Run directories: `check_output` (before any work, changing nothing) and `prepare_output` (after
  every input is loaded) decide what an --out may be and what --overwrite may delete (RUN_MARKER);
  `own_directory` is the rule for a directory a command regenerates whole (the demo's).

What it does not do: load models (models.py), restore an optimizer or a metrics file (loop.start_from),
or decide when to save (loop.Stage, for the trainers in sft.py and rl.py).

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
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import tempfile
import warnings

import numpy as np
import torch
import torch.distributed as torch_dist

import ddp

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


# -----------------------------------------------------------------------------
# A trainer's checkpoint: model + tokenizer + trainer state, saved with `save`, resumed exactly

def first_non_finite(model) -> str | None:
    """The name of the first parameter holding a NaN or inf, or None."""
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            return name
    return None


# Settings a resume may change without changing what is trained (how often to save, evaluate, what to
# measure, how to batch the forward passes); every other setting must match the checkpoint's unless
# --override-config.
FREE_SETTINGS = ("eval_every", "eval_limit", "save_every", "micro_batch_size", "rollout_batch_size",
                 "term_grad_norms", "probe_samples", "pool_eval_limit")
STATE_FILE = "trainer_state.pt"
SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
RUN_MARKER = ".dgpo-run"   # in every run directory a trainer made: only those may be replaced (--overwrite)
# what a run directory holds beside its checkpoint; every save moves them into the new directory
RUN_ENTRIES = ("metrics.jsonl", "best", "tensorboard", "wandb", RUN_MARKER)
CONFIG_FILE = "train_config.json"   # the run's settings, readable, next to every checkpoint


def save_checkpoint(out_dir: str, model, tokenizer, dist: ddp.Dist, state: dict | None = None,
                    carry=None, extra: dict | None = None, save_dtype: str = "float32",
                    info: dict | None = None) -> None:
    """An HF directory (model + tokenizer) loadable by AutoModelForCausalLM, plus the trainer state:
    stage, config and its hash, optimizer, scheduler, step, data position and every rank's RNG
    states, for exact resume; `extra` models (PPO's critic) go to subdirectories of their name;
    train_config.json holds the stage, its settings and `info` (paths, command line) as JSON.
    save_dtype="bfloat16" halves the model files (the optimizer state stays fp32; a resume then
    continues from bf16-rounded weights, so it is no longer bit-identical). Written atomically
    (`save`): a crash at any moment leaves the previous checkpoint or this one, never a
    mix. A model with non-finite weights is never saved. `model` and the `extra` models are Hugging
    Face models (a trainer passes models.hf_model of its DDP / HeadAtPositions view)."""
    raw, others = model, dict(extra or {})
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state() if dist.device.type == "cuda" else None}
    rngs = ddp.all_gather_objects(dist, [rng])
    for name, m in [("the model", raw)] + list(others.items()):
        bad = first_non_finite(m)
        if bad is not None:
            raise RuntimeError(f"not saving {out_dir}: weight {bad} of {name} holds NaN or inf values")
    if dist.master:
        def write(tmp: str) -> None:
            for where, m in [("", raw)] + [(name, m) for name, m in others.items()]:
                with writing(out_dir, f"{where}/ model files" if where else "model files"):
                    save_pretrained(m, os.path.join(tmp, where), save_dtype)
            with writing(out_dir, "tokenizer files"):
                tokenizer.save_pretrained(tmp)
            if state is not None:
                full = {**state, "rng": rngs, "world_size": dist.world_size, "save_dtype": save_dtype}
                if "config" in state:
                    full["config_hash"] = config_hash(state["config"])
                with writing(out_dir, STATE_FILE):
                    torch.save(full, os.path.join(tmp, STATE_FILE))
                readable = {"stage": state.get("stage"), "step": state.get("step"), "config": state.get("config"),
                            "config_hash": full.get("config_hash"), "inputs": state.get("inputs"),
                            "world_size": dist.world_size, "save_dtype": save_dtype, **(info or {})}
                with writing(out_dir, CONFIG_FILE), open(os.path.join(tmp, CONFIG_FILE), "w") as f:
                    json.dump(readable, f, indent=1, default=str)
        with writing(out_dir, "the checksums or the swap"):
            save(out_dir, write, carry=RUN_ENTRIES if carry is None else carry)
    if dist.enabled:
        torch_dist.barrier()


@contextlib.contextmanager
def writing(out_dir: str, what: str):
    """A failed write of a checkpoint file (a full disk: torch.save says only "basic_ios::clear:
    iostream error") becomes an OSError naming the checkpoint and the file; the previous checkpoint
    is intact (`save` replaces it only after everything is written)."""
    try:
        yield
    except Exception as error:           # OSError, torch's RuntimeError, safetensors' own SafetensorError
        if isinstance(error, CheckpointWriteError):
            raise
        raise CheckpointWriteError(f"cannot write checkpoint {out_dir} ({what}): {first_line(error)}; the previous "
                                   f"checkpoint there, if any, is unchanged (full disk? try --save-dtype bfloat16 "
                                   "or another --out)") from error


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (see `writing`)."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (transformers' and torch's run to many lines)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def save_pretrained(model, path: str, save_dtype: str) -> None:
    """model.save_pretrained(path), its floating-point weights cast to save_dtype (the model itself,
    still training, is left as it is)."""
    dtype = SAVE_DTYPES[save_dtype]
    if dtype == torch.float32:
        model.save_pretrained(path)
        return
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.save_pretrained(path, state_dict=state)
    config_path = os.path.join(path, "config.json")       # HF records the training copy's dtype:
    with open(config_path) as f:                          # say what the files hold instead
        config = json.load(f)
    config["dtype"] = save_dtype
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)


def load_trainer_state(ckpt_dir: str, dist: ddp.Dist, stage: str | None = None, config: dict | None = None,
                       override: bool = False, inputs: dict | None = None) -> dict:
    """The trainer state of a checkpoint (after finishing any save a crash interrupted, its checksum
    verified), with every rank's RNG restored. Refuses a checkpoint of another stage, and one whose
    settings differ from `config` (except FREE_SETTINGS) or whose inputs differ from `inputs`
    ({argument: fingerprint}, for the inputs the checkpoint recorded too) unless
    `override`; state["changed"] and state["changed_inputs"] list what differs."""
    recover_resume(ckpt_dir, dist)
    path = os.path.join(ckpt_dir, STATE_FILE)
    verify(ckpt_dir, which=lambda rel: rel == STATE_FILE)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:   # a truncated zip: save makes this impossible for its own saves
        raise ValueError(f"--resume {ckpt_dir}: {STATE_FILE} cannot be read ({first_line(error)})") from None
    if stage is not None and state.get("stage") != stage:
        raise ValueError(f"--resume {ckpt_dir}: a checkpoint of stage {state.get('stage')!r}; "
                         f"this is stage {stage!r}, which cannot continue it")
    if state["world_size"] != dist.world_size:
        raise ValueError(f"{path} was written by {state['world_size']} ranks; resume with the same number")
    state["changed"], state["changed_inputs"] = {}, {}
    if config is not None:
        changed = config_differences(state.get("config", {}), config, FREE_SETTINGS)
        if changed and not override:
            listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise ValueError(f"--resume {ckpt_dir}: these settings differ from the checkpoint's ({listed}). "
                             "Resume with the same settings, or pass --override-config to apply the new "
                             "values from here on (the change is recorded in metrics.jsonl)")
        state["changed"] = changed
    if inputs is not None and state.get("inputs") is not None:
        changed = input_differences(state["inputs"], inputs)
        if changed and not override:
            listed = "; ".join(f"{arg} {describe_input(new)} (was {describe_input(old)})"
                               for arg, (old, new) in changed.items())
            raise ValueError(f"--resume {ckpt_dir}: these inputs differ from the ones the run was started with: "
                             f"{listed}. Resume with the same inputs, or pass --override-config to continue on the "
                             "new ones (the change is recorded in metrics.jsonl)")
        state["changed_inputs"] = changed
    rng = state["rng"][dist.rank]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and dist.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"])
    return state


def describe_input(fp: dict | None) -> str:
    """A fingerprint in a few words, for an error message."""
    if fp is None:
        return "not given"
    if "bytes" not in fp and "files" not in fp:          # a URL or a Hub id
        return fp["path"]
    if "files" in fp:
        return f"{fp['path']} ({len(fp['files'])} files)"
    rows = f", {fp['rows']} rows" if "rows" in fp else ""
    return f"{fp['path']} ({fp['bytes']} bytes{rows}, head/tail sha256 {fp['head_tail_sha256']})"


def input_fingerprints(paths: dict, rows: dict | None = None) -> dict:
    """{argument: fingerprint(path)} for the inputs given (None ones skipped); a URL or a Hub
    id is recorded by its name (what a server or the Hub serves cannot be fingerprinted here);
    `rows`: the row count of each data file read."""
    out = {}
    for arg, path in paths.items():
        if path is None:
            continue
        if "://" in path or not os.path.exists(path):
            out[arg] = {"path": path, "name": path}
        else:
            out[arg] = fingerprint(path, (rows or {}).get(arg))
    return out


def resumable_step(run_dir: str) -> int | None:
    """The step of the checkpoint a run directory can resume from, or None when it holds none (never
    saved, or no such directory). A save a crash interrupted is finished or rolled back first (recover),
    so the step read is the one a --resume would continue from. For one process (rank 0's view)."""
    recover(run_dir, carry=RUN_ENTRIES)
    if not os.path.isfile(os.path.join(run_dir, STATE_FILE)):
        return None
    with open(os.path.join(run_dir, CONFIG_FILE)) as f:
        return int(json.load(f)["step"])


def recover_resume(resume: str | None, dist: ddp.Dist) -> None:
    """Before anything reads a --resume directory: finish or roll back a save that a crash
    interrupted (recover), on rank 0, so that weights, state and metrics all come from
    one complete checkpoint; then refuse a directory that holds no trainer state, saying why."""
    if resume is None:
        return
    if dist.master:                     # also when `resume` itself is gone: a crash between two renames
        recover(resume, carry=RUN_ENTRIES)
    if dist.enabled:
        torch_dist.barrier()
    if not os.path.isdir(resume):
        raise FileNotFoundError(f"--resume {resume}: not a model directory (no such directory)")
    if not os.path.isfile(os.path.join(resume, STATE_FILE)):
        raise FileNotFoundError(f"--resume {resume}: no checkpoint to resume from in it (no {STATE_FILE}). A run "
                                "saves one at its end, every --save-every N steps and when Ctrl-C or SIGTERM stops "
                                "it; a run that crashed before its first save has none: start it again without "
                                "--resume (with --overwrite to replace its directory)")


# -----------------------------------------------------------------------------
# Run directories: what an --out may be, and what --overwrite may delete


def _same(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _inside(path: str, parent: str) -> bool:
    """`path` is `parent` or lies under it (symbolic links resolved)."""
    path, parent = os.path.realpath(path), os.path.realpath(parent)
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def is_run_dir(path: str) -> bool:
    """A directory a trainer made: it holds RUN_MARKER or a checkpoint manifest (checkpoint.py)."""
    return os.path.isfile(os.path.join(path, RUN_MARKER)) or manifest(path) is not None


def check_writable(out: str) -> None:
    """The output can be created: its nearest existing ancestor is a directory a file can be written in
    (tried, so a read-only mount or a missing permission shows here, not after the first step)."""
    probe = os.path.abspath(out)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"--out {out}: cannot be created, {probe} is a file")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as error:
        raise PermissionError(f"--out {out}: cannot write in {probe} ({error.strerror})") from None


def check_output(out: str, resume: str | None, overwrite: bool, kind: str = "dir", inputs: dict | None = None) -> None:
    """Before any work, changing nothing (prepare_output acts, after every input is loaded):
    - an output that is, or contains, one of the `inputs` ({argument: path} of what the stage reads)
      is refused, --overwrite or not: writing there would destroy what the run reads (resuming a run
      in its own directory is the one exception);
    - an existing non-empty output is refused unless the run resumes from it or --overwrite is given,
      and --overwrite only replaces a directory a trainer made (is_run_dir); the message names the
      command that works;
    - the output must be writable.
    kind="file" for tgo's trajectories file."""
    for arg, path in (inputs or {}).items():
        if not path or "://" in path or (kind == "dir" and arg == "--resume" and _same(path, out)):
            continue
        if _same(path, out) or (kind == "dir" and _inside(path, out)):
            raise ValueError(f"--out {out}: {'is' if _same(path, out) else 'contains'} the input {arg} {path}; "
                             "writing there would destroy what this run reads: choose another --out")
    if kind == "file":
        if os.path.isdir(out):
            raise ValueError(f"--out {out}: is a directory; tgo writes a trajectories file (e.g. {out}/tgo.jsonl)")
        if os.path.exists(out) and not overwrite:
            raise ValueError(f"--out {out}: exists; pass --overwrite to replace it")
        check_writable(out)
        return
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out}: exists and is not a directory")
    if resume is not None and _same(resume, out):
        return
    if os.path.isdir(out) and os.listdir(out):
        if not is_run_dir(out):
            raise ValueError(f"--out {out}: exists, is not empty and is not a directory this trainer wrote (no "
                             f"{RUN_MARKER} marker or checkpoint manifest); refusing to replace it even with "
                             "--overwrite: choose another --out")
        if not overwrite:
            if os.path.isfile(os.path.join(out, STATE_FILE)):
                raise ValueError(f"--out {out}: exists and is not empty; pass --resume {out} to continue it, "
                                 "or --overwrite to replace it")
            raise ValueError(f"--out {out}: exists and is not empty; it holds a run that saved no checkpoint to "
                             "resume (it stopped before its first save): pass --overwrite to replace it")
    check_writable(out)


def prepare_output(out: str, resume: str | None, overwrite: bool) -> None:
    """After every input is loaded and check_output passed: with --overwrite, deletes the entries the
    previous run wrote (its checkpoint's files, RUN_ENTRIES; anything else in the directory stays);
    creates the directory with RUN_MARKER; a run resumed into a new directory gets the resumed run's
    metrics (and best/) there."""
    same = resume is not None and _same(resume, out)
    if overwrite and not same and os.path.isdir(out) and is_run_dir(out):
        recover(out, carry=RUN_ENTRIES)         # an interrupted swap leaves its pieces beside it
        own = set(own_entries(out)) | set(RUN_ENTRIES) | {".best.saving", ".best.old", "metrics.jsonl.tmp"}
        for name in sorted(own & set(os.listdir(out))):
            path = os.path.join(out, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, RUN_MARKER), "w") as f:
        f.write("written by train.py; --overwrite may replace what a run wrote here, nothing else\n")
    if resume is not None and not same:   # continue the resumed run's metrics (and best/) in the new directory
        source = os.path.join(resume, "metrics.jsonl")
        if os.path.isfile(source):
            shutil.copyfile(source, os.path.join(out, "metrics.jsonl"))
        if os.path.isdir(os.path.join(resume, "best")):
            shutil.copytree(os.path.join(resume, "best"), os.path.join(out, "best"))


def own_directory(out: str, marker: str, entries, owner: str) -> None:
    """A directory a command regenerates whole (the demo's): what an earlier run of it wrote there
    (`entries`) is deleted, so the command works when run twice, and anything else is kept; a non-empty
    directory without its `marker` file is refused (`owner` names the command in the messages)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out}: exists and is not a directory; {owner} writes a directory of runs")
    if os.path.isdir(out) and os.listdir(out):
        if not os.path.isfile(os.path.join(out, marker)):
            raise ValueError(f"--out {out}: exists, is not empty and was not written by {owner}; "
                             f"choose another --out ({owner} replaces its own directory)")
        for name in entries:
            path = os.path.join(out, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.remove(path)
    check_writable(out)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, marker), "w") as f:
        f.write(f"written by {owner}; its next run here replaces what it wrote\n")
