"""Data files: questions, corpus passages and trajectories, with loaders that fail loudly.

What it does: reads and writes the files every stage exchanges and checks each row, naming the file and
the line (or Parquet row) in every error, so a malformed row never becomes a silently wrong example.
  * questions — `load_questions` picks the reader by extension: `.jsonl`, `.jsonl.gz`, or `.parquet`
    (Search-R1's `nq_hotpotqa_train/train.parquet` / `test.parquet`; needs the optional pyarrow). Field names
    are FlashRAG / Search-R1's, so their files load as they are:
    {"question": str, "golden_answers": [str, ...], "id"?: str, "data_source"?: str, ...}.
    `golden_answers` may be a single string (some FlashRAG files) or an array; it becomes a list of str.
    A row without it takes veRL's `reward_model.ground_truth.target`, which is what Search-R1's reward
    reads (verl/trainer/main_ppo.py, RewardManager.__call__; verl/utils/reward_score/qa_em.py,
    compute_score_em). A row whose every gold normalises to nothing ("The The", "") is kept and scored
    as Search-R1 scores it -- it can never match -- and one warning counts such rows and names the first.
    A missing `id` becomes "<file stem>-<line>" (Parquet: "<file stem>-<row>", rows counted from 0 as
    pyarrow and pandas count them), a missing `data_source` the file stem. Search-R1's `reward_model`,
    `extra_info` and `ability` are dropped. Its `prompt` (the chat [{"role": "user", "content": …}] that
    its rl_dataset.py renders) is kept as row["prompt"] and compared with the user message rollout.py
    builds from `question`: on Search-R1's own files they agree byte for byte; where they differ (a
    customised prompt), one warning names the first differing row, where the texts first differ and
    how many rows differ (the rollout still builds its own). Other keys are kept (e.g.
    `supporting_ids`, used by the evidence-given probe). A question's identity
    is (data_source, id) — `question_key` — because merged files repeat FlashRAG's per-split ids
    (`test_0` in nq and in hotpotqa); a repeat within one source is an error naming both lines.
    `sample_questions(questions, n, seed)`: what a limit on questions means (eval --limit, rl's
    validation): a seeded sample stratified by data_source, each source keeping its share of the file.
  * corpus — wiki-18 format, {"id": str, "contents": "title\\ntext"}; the loader is retriever.py's,
    re-exported here, because the format belongs to the retriever (a `.gz` corpus is its job too).
  * trajectories — one rollout per line: the question fields, `response_text`, and the token-level
    record needed to train on it again without re-tokenising model output: `input_ids`, `loss_mask`
    (1 = model-sampled), `prompt_length`, plus the rollout's counts and flags (see rollout.Trajectory),
    and `tokenizer`: the `vocab_fingerprint` of the tokenizer that made the ids (its id -> token table
    and size: what distillation needs to share; not its eos / pad ids). `load_trajectories` refuses rows
    made with another vocabulary than the caller's; `tokenizer_differences` names what differs between
    two tokenizers. Older files record a `legacy_fingerprint` (which included the eos / pad ids): they
    load when the tokenizer that made them is named (`accepted_fingerprints(student, teacher)`).
  * `read_jsonl` / `write_jsonl` read and write gzip when the path ends in `.gz`; writes are atomic.
    `append_jsonl` / `read_appended`: progress files that grow row by row (tgo, eval) and survive a
    crash mid-append (the torn last line is dropped).

What it does not do: tokenise, batch or shuffle (models.py and loop.py do), fetch anything from a hub, or need
anything but the standard library itself (pyarrow is imported only when a `.parquet` file is read;
rollout.py, and with it torch, only when a question file has a `prompt` column to compare; the
re-exported corpus loader brings retriever.py's numpy; arc_metric's answer normalisation is standard
library only).

    questions = load_questions("data/nq_hotpotqa_train/train.parquet")  # or .jsonl / .jsonl.gz
    corpus = load_corpus("data/wiki-18.jsonl")
    write_jsonl("runs/x/tgo.jsonl.gz", [{**r, "tokenizer": vocab_fingerprint(tok)} for r in records])
    records = load_trajectories("runs/x/tgo.jsonl.gz", len(tok), accepted_fingerprints(tok, teacher_tok))
    tokenizer_differences(tok, teacher_tok)        # ["id 151643: '<|endoftext|>' vs 'x'", ...] or []
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import warnings
import zlib
from collections.abc import Collection

from arc_metric import normalize_answer     # the scoring rule decides which gold answers can ever match
from retriever import load_corpus  # noqa: F401  (re-exported: the corpus format is the retriever's)

# -----------------------------------------------------------------------------
# JSONL, plain or gzip


def _parse_line(raw: bytes, where: str) -> dict | None:
    """The JSON object on one line, None for a blank line; anything else is an error."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def read_jsonl(path: str) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; any line that is not a JSON object is an error.
    A path ending in `.gz` is decompressed (a corrupt stream is an error naming the file)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    rows, line_no = [], 0
    opener = gzip.open if path.lower().endswith(".gz") else open
    with opener(path, "rb") as f:               # bytes, so a bad encoding is reported with its line
        try:
            for line_no, raw in enumerate(f, start=1):
                row = _parse_line(raw, f"{path}:{line_no}")
                if row is not None:
                    rows.append((line_no, row))
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:   # raised only by gzip's reader
            raise ValueError(f"{path}: not a valid gzip stream ({e}); "
                             f"{line_no} lines were read before the error") from None
    if not rows:
        raise ValueError(f"{path}: the file has no rows")
    return rows


def write_jsonl(path: str, rows) -> None:
    """Writes rows atomically (temp file + rename), so a crash never leaves half a file behind.
    A path ending in `.gz` is gzip-compressed (no name or time in the header: same rows, same bytes)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp, compress = path + ".tmp", path.lower().endswith(".gz")
    try:
        with open(tmp, "wb") as raw:
            f = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) if compress else raw
            with f:                             # gzip's trailer is written here, before `raw` closes
                for row in rows:
                    f.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
        os.replace(tmp, path)
    except BaseException:                       # e.g. a row that is not JSON: the old file stays as it was
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def append_jsonl(path: str, rows) -> None:
    """Appends rows to a plain JSONL progress file and flushes them to disk, so that a crash can cut
    at most its last line (which read_appended drops)."""
    with open(path, "ab") as f:
        for row in rows:
            f.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def read_appended(path: str) -> list[dict]:
    """The rows of a file written by append_jsonl ([] if there is none). A torn last line (no newline
    at its end, what a crash or a full disk leaves mid-append) is cut off the file, with a warning, so
    the next append starts on a line of its own; any other bad line is an error naming file and line."""
    if not os.path.isfile(path):
        return []
    with open(path, "rb") as f:
        content = f.read()
    complete = content.rfind(b"\n") + 1                  # bytes up to the last whole line
    if complete < len(content):
        warnings.warn(f"{path}: dropped a torn last line ({len(content) - complete} bytes), what a crash or a "
                      "full disk leaves in the middle of an append")
        os.truncate(path, complete)
    rows = []
    for line_no, raw in enumerate(content[:complete].splitlines(), start=1):
        row = _parse_line(raw, f"{path}:{line_no}")
        if row is not None:
            rows.append(row)
    return rows


# -----------------------------------------------------------------------------
# Questions: JSONL or Search-R1 Parquet

QUESTION_EXTENSIONS = (".jsonl", ".jsonl.gz", ".parquet")
SEARCH_R1_DROPPED = ("reward_model", "extra_info", "ability")   # Search-R1 columns not read


def read_parquet_rows(path: str) -> list[tuple[int, dict]]:
    """(row number from 0, row) for every row of a Parquet file, without the SEARCH_R1_DROPPED columns
    (never read from disk). Needs pyarrow, imported here so the rest of the module does not."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ImportError(f"{path}: reading Parquet needs the optional package 'pyarrow' "
                          "(pip install pyarrow)") from None
    try:
        parquet = pyarrow.parquet.ParquetFile(path)
        names = parquet.schema_arrow.names
        if "question" not in names:
            raise ValueError(f"{path}: no 'question' column (columns: {', '.join(names)})")
        if "golden_answers" not in names and "reward_model" not in names:
            raise ValueError(f"{path}: no 'golden_answers' column, nor veRL's 'reward_model' (whose "
                             f"ground_truth.target holds the answers) (columns: {', '.join(names)})")
        # reward_model is read only when it is where the answers are
        columns = [name for name in names if name not in SEARCH_R1_DROPPED or
                   (name == "reward_model" and "golden_answers" not in names)]
        rows = [row for batch in parquet.iter_batches(columns=columns) for row in batch.to_pylist()]
    except (pyarrow.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
    if not rows:
        raise ValueError(f"{path}: the file has no rows")
    return list(enumerate(rows))


def _as_list(value):
    """golden_answers as a list: a bare string is one answer; numpy / arrow arrays and tuples are lists."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, tuple):
        return list(value)
    for method in ("tolist", "to_pylist"):      # numpy.ndarray, pyarrow.Array (duck-typed, nothing imported)
        if hasattr(value, method):
            return getattr(value, method)()
    return value


def check_question(row: dict, where: str, default_id: str, default_source: str) -> dict:
    """The row validated and completed with `id` and `data_source` (see the module docstring);
    raises ValueError prefixed with `where`."""
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: 'question' must be a non-empty string")
    given = "golden_answers" in row
    golds = _as_list(row["golden_answers"] if given else verl_target(row))
    if not isinstance(golds, list) or not golds or not all(isinstance(g, str) for g in golds):
        raise ValueError(f"{where}: 'golden_answers' must be a non-empty list of strings" + ("" if given else
                         " (absent here; nor does veRL's reward_model.ground_truth.target hold one)"))
    qid = row.get("id", default_id)
    if isinstance(qid, bool) or not isinstance(qid, (str, int)) or qid == "":
        raise ValueError(f"{where}: 'id' must be a non-empty string or an integer, got {qid!r}")
    source = row.get("data_source", default_source)
    if not isinstance(source, str) or not source:
        raise ValueError(f"{where}: 'data_source' must be a non-empty string")
    kept = {k: v for k, v in row.items() if k not in SEARCH_R1_DROPPED}
    if "prompt" in row:
        kept["prompt"] = prompt_messages(row["prompt"], where)
    return {**kept, "id": str(qid), "question": str(question), "golden_answers": [str(g) for g in golds],
            "data_source": str(source)}


def verl_target(row: dict):
    """The answers of a veRL row, reward_model["ground_truth"]["target"], or None where it has none."""
    truth = row.get("reward_model")
    truth = truth.get("ground_truth") if isinstance(truth, dict) else None
    return truth.get("target") if isinstance(truth, dict) else None


def never_matches(question: dict) -> bool:
    """True when every gold normalises to nothing ("The The", "", "!!!"): no answer can ever match it."""
    return not any(normalize_answer(g) for g in question["golden_answers"])


def prompt_messages(value, where: str) -> list[dict]:
    """A row's `prompt` as Search-R1 stores it, a chat [{"role": "user", "content": str}, ...] (a plain
    str is taken as the user message); anything else raises ValueError prefixed with `where`."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    messages = _as_list(value)
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise ValueError(f"{where}: 'prompt' must be a chat, a non-empty list of {{\"role\": str, \"content\": str}} "
                         f"messages as Search-R1 writes it (or the user message as a str), got {value!r:.120}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def built_prompt(question: str) -> str:
    """The user message rollout.py builds from a question (PROMPT_TEMPLATE, docs/method.md §2): the
    text Search-R1's scripts/data_process/qa_search_{train,test}_merge.py (make_prefix, lines 32-36)
    write into the `prompt` column, whose rl_dataset.py (lines 126-131) renders it. Imports rollout.py
    (and so torch) on first use: only files with a `prompt` column need it."""
    from rollout import PROMPT_TEMPLATE, format_question
    return PROMPT_TEMPLATE.format(question=format_question(question))


PROMPT_CONTEXT = 40     # characters shown around the first difference of two prompts


def prompt_difference(messages: list[dict], built: str) -> str | None:
    """None when the chat is the one user message `built`, else where they first differ, in words."""
    roles = [m["role"] for m in messages]
    if roles != ["user"]:
        return (f"the file's prompt is a chat of {len(messages)} messages (roles: {', '.join(roles)}), this "
                "project's is one user message")
    content = messages[0]["content"]
    if content == built:
        return None
    k = next((i for i, (a, b) in enumerate(zip(content, built)) if a != b), min(len(content), len(built)))
    start = max(0, k - PROMPT_CONTEXT // 2)
    return (f"they first differ at character {k}: the file has {content[start:k + PROMPT_CONTEXT]!r}, "
            f"the project builds {built[start:k + PROMPT_CONTEXT]!r}")


def question_key(row: dict) -> tuple[str, str]:
    """A question's identity, (data_source, id): ids alone repeat across the sources of a merged file."""
    return row["data_source"], row["id"]


def load_questions(path: str) -> list[dict]:
    """Question rows from a .jsonl, .jsonl.gz or .parquet file, validated and completed with `id` and
    `data_source`; (data_source, id) must be unique (see the module docstring)."""
    extension = next((e for e in QUESTION_EXTENSIONS if path.lower().endswith(e)), None)
    if extension is None:
        raise ValueError(f"{path}: unsupported question file; the extension must be one of "
                         f"{', '.join(QUESTION_EXTENSIONS)}")
    stem = os.path.basename(path)[:-len(extension)]
    parquet = extension == ".parquet"
    unit = "row" if parquet else "line"
    questions, first_seen, prompts_differ, first_differing = [], {}, 0, None
    unmatchable, first_unmatchable = 0, None
    for n, row in read_parquet_rows(path) if parquet else read_jsonl(path):
        where = f"{path}: row {n}" if parquet else f"{path}:{n}"
        question = check_question(row, where, default_id=f"{stem}-{n}", default_source=stem)
        key = question_key(question)
        if key in first_seen:
            raise ValueError(f"{where}: duplicate id {key[1]!r} in data_source {key[0]!r} "
                             f"(first on {unit} {first_seen[key]})")
        first_seen[key] = n
        if "prompt" in question:
            difference = prompt_difference(question["prompt"], built_prompt(question["question"]))
            if difference is not None:
                prompts_differ += 1
                first_differing = first_differing or (where, difference)
        if never_matches(question):      # kept: Search-R1 scores it (0), and dropping it would change the mean
            unmatchable += 1
            first_unmatchable = first_unmatchable or (where, question["golden_answers"])
        questions.append(question)
    if first_unmatchable is not None:
        where, golds = first_unmatchable
        warnings.warn(f"{where}: every golden answer ({golds!r}) is empty once normalised (articles, punctuation "
                      f"and spaces removed); {unmatchable} of {len(questions)} rows are so. They are kept and "
                      "scored as Search-R1 scores them: no answer can match, so each scores 0", stacklevel=2)
    if first_differing is not None:
        where, difference = first_differing
        warnings.warn(f"{where}: the prompt in the file is not the one rollout.py builds from 'question' "
                      f"(docs/method.md §2): {difference}; {prompts_differ} of {len(questions)} rows differ. The "
                      "rollout builds its own prompt; the file's is kept in each row's 'prompt', and --prompt-from data "
                      "rolls out from it instead", stacklevel=2)
    return questions


# -----------------------------------------------------------------------------
# A limit on questions: a seeded sample that keeps every source's share

def source_quotas(sizes: dict[str, int], n: int) -> dict[str, int]:
    """How many of n sampled questions each source gets: its share n * size / total, rounded by the
    largest-remainder rule (every source gets the floor of its share; the rows left over go one each to
    the largest fractional parts, ties to the source that appears first). Sums to min(n, total).
    {"nq": 3610, "hotpotqa": 7405}, 100 -> {"nq": 33, "hotpotqa": 67}."""
    total = sum(sizes.values())
    if n >= total:
        return dict(sizes)
    shares = {source: n * size / total for source, size in sizes.items()}
    quotas = {source: int(share) for source, share in shares.items()}
    order = sorted(sizes, key=lambda source: -(shares[source] - quotas[source]))   # stable: ties keep file order
    for source in order[:n - sum(quotas.values())]:
        quotas[source] += 1
    return quotas


def sample_questions(questions: list[dict], n: int, seed: int = 0) -> list[dict]:
    """n question rows sampled within each data_source (source_quotas: each source keeps its share of
    the file), in their original order; all of them when n >= len(questions). Which rows a source
    gives: those with the smallest sha256(f"{seed}\\n{data_source}\\n{id}") (a row without an id:
    its position), so the sample is the same on every machine and Python version, and a source's
    sample does not depend on the other sources or on the order of the file. Why: Search-R1's
    test.parquet is sorted by source (scripts/data_process/qa_search_test_merge.py concatenates the
    sources, lines 54-109), so its first N rows are NQ only. (The official DGPO scripts evaluate every
    row, data.val_data_num=null in scripts/train_dgpo.sh.)"""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"sample_questions: n must be a positive integer, got {n!r}")
    if n >= len(questions):
        return list(questions)
    by_source: dict[str, list[int]] = {}
    for i, row in enumerate(questions):
        by_source.setdefault(row.get("data_source"), []).append(i)

    def rank(i: int) -> bytes:
        row = questions[i]
        name = f"{seed}\n{row.get('data_source')}\n{row['id'] if 'id' in row else '#' + str(i)}"
        return hashlib.sha256(name.encode("utf-8")).digest()

    quotas = source_quotas({source: len(rows) for source, rows in by_source.items()}, n)
    chosen = [i for source, rows in by_source.items() for i in sorted(rows, key=rank)[:quotas[source]]]
    return [questions[i] for i in sorted(chosen)]


# -----------------------------------------------------------------------------
# Trajectories and the tokenizer they were made with

TRAJECTORY_KEYS = ("question", "golden_answers", "response_text", "input_ids", "loss_mask", "prompt_length")
TOKENIZER_KEY = "tokenizer"     # each row's vocab_fingerprint, written by whoever writes trajectories
VOCAB_PREFIX = "vocab-"         # marks a vocab_fingerprint; a bare 16-hex-digit value is a legacy_fingerprint


def _vocab_table(tokenizer, caller: str) -> list[tuple[int, str]]:
    """[(id, token), ...] in id order, from get_vocab() (added tokens included)."""
    if not callable(getattr(tokenizer, "get_vocab", None)):
        raise TypeError(f"{caller}: {type(tokenizer).__name__} has no get_vocab()")
    return sorted((int(i), str(token)) for token, i in tokenizer.get_vocab().items())


def _vocab_size(tokenizer, table: list) -> int:
    """len(tokenizer) (the rows of logits a model must have for it), or the table's length for a
    duck-typed tokenizer without __len__."""
    return len(tokenizer) if callable(getattr(tokenizer, "__len__", None)) else len(table)


def _sha16(obj) -> str:
    canonical = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def vocab_fingerprint(tokenizer) -> str:
    """What distillation needs two tokenizers to share, as "vocab-" + 16 hex digits of sha256 over the
    compact JSON (sorted keys) {"size": len(tokenizer), "vocab": [[id, token], ...] in id order}: the
    same ids for the same strings (get_vocab(), added tokens included) and the same vocabulary size.
    Not the bos / eos / pad ids: a base-derived teacher whose eos is <|endoftext|> and an instruct
    student whose eos is <|im_end|> share every id, and trajectories store ids, not text. Merges and
    normalisers are not part of it either."""
    table = _vocab_table(tokenizer, "vocab_fingerprint")
    return VOCAB_PREFIX + _sha16({"size": _vocab_size(tokenizer, table), "vocab": table})



def legacy_fingerprint(tokenizer) -> str:
    """The fingerprint trajectory files recorded before vocab_fingerprint, kept only to read them:
    16 hex digits of sha256 over {"special": {"bos": id|null, "eos": ..., "pad": ...}, "vocab":
    [[id, token], ...]} (compact JSON, sorted keys). It includes the special ids, so two tokenizers
    that differ only in eos have different legacy fingerprints (see accepted_fingerprints)."""
    table = _vocab_table(tokenizer, "legacy_fingerprint")
    specials = {}
    for name in ("bos", "eos", "pad"):
        i = getattr(tokenizer, f"{name}_token_id", None)
        specials[name] = None if i is None else int(i)
    return _sha16({"vocab": table, "special": specials})


SHOWN_DIFFERENCES = 5      # ids named by tokenizer_differences before "and N more"


def tokenizer_differences(first, second) -> list[str]:
    """What makes two tokenizers unusable together for distillation, one line each ([] = none): their
    vocabulary sizes, and the first SHOWN_DIFFERENCES ids whose token differs (or that one of them
    lacks), each "<what>: <first's> vs <second's>". eos, pad and bos ids are not compared."""
    tables = [_vocab_table(t, "tokenizer_differences") for t in (first, second)]
    sizes = [_vocab_size(t, table) for t, table in zip((first, second), tables)]
    differences = [f"vocabulary size {sizes[0]} vs {sizes[1]}"] if sizes[0] != sizes[1] else []
    tokens = [dict(table) for table in tables]
    ids = [i for i in sorted(tokens[0].keys() | tokens[1].keys()) if tokens[0].get(i) != tokens[1].get(i)]
    for i in ids[:SHOWN_DIFFERENCES]:
        a, b = (repr(t[i]) if i in t else "(no such id)" for t in tokens)
        differences.append(f"id {i}: {a} vs {b}")
    if len(ids) > SHOWN_DIFFERENCES:
        differences.append(f"and {len(ids) - SHOWN_DIFFERENCES} more ids")
    return differences


def accepted_fingerprints(tokenizer, *made_with) -> frozenset[str]:
    """The TOKENIZER_KEY values a trajectory row may record to be trained on with `tokenizer`: its
    vocab_fingerprint, and the legacy_fingerprint of it and of each tokenizer in `made_with` (e.g. kd's
    teacher, which made the file). Older files recorded legacy fingerprints, which include eos/pad ids;
    naming the tokenizer that made them lets them load even when its eos differs. Each of `made_with`
    must share `tokenizer`'s vocabulary (tokenizer_differences), else ValueError naming what differs."""
    for other in made_with:
        differences = tokenizer_differences(tokenizer, other)
        if differences:
            raise ValueError("accepted_fingerprints: the tokenizers differ: " + "; ".join(differences))
    return frozenset([vocab_fingerprint(tokenizer)] + [legacy_fingerprint(t) for t in (tokenizer, *made_with)])


def _is_legacy(fingerprint: str) -> bool:
    return re.fullmatch(r"[0-9a-f]{16}", fingerprint) is not None


def check_trajectory(row: dict, where: str) -> None:
    """Raises ValueError (prefixed with `where`) unless `row` can be trained on as it is."""
    missing = [k for k in TRAJECTORY_KEYS if k not in row]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}")
    ids, mask, n_prompt = row["input_ids"], row["loss_mask"], row["prompt_length"]
    if not isinstance(ids, list) or not ids or not all(type(i) is int and i >= 0 for i in ids):
        raise ValueError(f"{where}: 'input_ids' must be a non-empty list of non-negative ints")
    if not isinstance(mask, list) or len(mask) != len(ids) or \
            not all(type(m) is int and m in (0, 1) for m in mask):
        raise ValueError(f"{where}: 'loss_mask' must be a list of 0/1 as long as input_ids ({len(ids)})")
    if type(n_prompt) is not int or not 0 < n_prompt <= len(ids):
        raise ValueError(f"{where}: 'prompt_length' must be an int in 1..{len(ids)}")
    if any(mask[:n_prompt]):
        raise ValueError(f"{where}: loss_mask is 1 inside the prompt")
    if not isinstance(row["golden_answers"], list):
        raise ValueError(f"{where}: 'golden_answers' must be a list")
    if TOKENIZER_KEY in row and (not isinstance(row[TOKENIZER_KEY], str) or not row[TOKENIZER_KEY]):
        raise ValueError(f"{where}: {TOKENIZER_KEY!r} must be a non-empty string (a vocab_fingerprint)")


def load_trajectories(path: str, vocab_size: int | None = None,
                      tokenizer_fingerprint: str | Collection[str] | None = None) -> list[dict]:
    """Trajectory rows, each checked. With `vocab_size`, token ids must be below it. With
    `tokenizer_fingerprint` (the caller's vocab_fingerprint, or a collection of accepted values such as
    accepted_fingerprints(student, teacher)), a row recording another one is refused; rows recording
    none (other tools) get one warning for the file and the vocab-size check only.

    Older files record a legacy_fingerprint (16 hex digits without the "vocab-" prefix); such a row loads
    when that value is among the accepted ones, i.e. when a tokenizer passed to accepted_fingerprints
    has the very vocabulary and bos/eos/pad ids that made it; otherwise it is refused with a message
    saying so (it may differ from the caller's only in eos or pad)."""
    accepted = None
    if tokenizer_fingerprint is not None:
        accepted = {tokenizer_fingerprint} if isinstance(tokenizer_fingerprint, str) else set(tokenizer_fingerprint)
        if not accepted or not all(isinstance(f, str) and f for f in accepted):
            raise TypeError(f"load_trajectories: tokenizer_fingerprint must be a non-empty str or a non-empty "
                            f"collection of them, got {tokenizer_fingerprint!r}")
    rows, unrecorded = [], 0
    for line_no, row in read_jsonl(path):
        where = f"{path}:{line_no}"
        check_trajectory(row, where)
        made_with = row.get(TOKENIZER_KEY)
        if accepted is not None and made_with is None:
            unrecorded += 1
        elif accepted is not None and made_with not in accepted:
            alike = sorted(f for f in accepted if _is_legacy(f) == _is_legacy(made_with))   # like for like
            given = " or ".join(alike or sorted(accepted))
            why = ("these trajectories were made with another tokenizer" if not _is_legacy(made_with) else
                   "this row records a fingerprint of the older kind, over the vocabulary and the bos/eos/pad ids, "
                   "so they were made with another tokenizer or with one that differs only in those ids; to read "
                   "them, also give the tokenizer that made them (data.accepted_fingerprints(yours, theirs); kd "
                   "gives its --teacher's)")
            raise ValueError(f"{where}: made with tokenizer {made_with}, but the tokenizer given is {given}: {why}")
        if vocab_size is not None and max(row["input_ids"]) >= vocab_size:
            raise ValueError(f"{where}: token id {max(row['input_ids'])} >= vocab size {vocab_size}: "
                             "these trajectories were made with another tokenizer")
        rows.append(row)
    if unrecorded:
        checked = f"checked by vocab size {vocab_size} only" if vocab_size is not None else "not checked"
        warnings.warn(f"{path}: {unrecorded} of {len(rows)} rows record no {TOKENIZER_KEY!r} fingerprint "
                      f"(an older file or another tool); their tokenizer is {checked}", stacklevel=2)
    return rows
