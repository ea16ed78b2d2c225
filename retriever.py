"""The agent's search engine: exact BM25 over a JSONL corpus, and the Search-R1 retrieval HTTP API.

What it does
- `BM25Retriever` scores a corpus of `{"id", "contents": "title\\ntext"}` rows (the wiki-18 format)
  with Okapi BM25. Its scores are the ones `rank_bm25.BM25Okapi` (rank-bm25 0.2.2, the reference that
  defines the numbers) gives for the same token lists -- bit for bit, not just approximately -- but
  computed from an inverted index with numpy: a batch of queries costs time proportional to the
  postings of its words (and for the few words in more than half of the passages, one pass over a
  precomputed dense row), scored a block of queries at a time, instead of a Python loop over every
  passage per query. Corpus files are UTF-8 JSONL, gzip-compressed when named .gz; a bad line is an
  error naming the file and line.
- The index is built in memory from the rows (`BM25Retriever(rows)`, `.from_jsonl`), or once, on
  disk, by `python retriever.py index --corpus C.jsonl --out DIR` (`write_index`), and then
  memory-mapped, not rebuilt, by `BM25Retriever.load(DIR)` / `serve --index DIR`, same scores;
  the size and CRC-32 of every file, recorded when it is written, are checked when it is loaded.
  A build, read or check that runs longer than 2 s shows its progress on stderr (tqdm, if installed).
- `format_passages` renders hits as the protocol's observation text (docs/method.md, 'The protocol').
- `HTTPRetriever` speaks the Search-R1 retrieval API (`POST /retrieve`), so the rollout can use an
  e5 + FAISS server someone already runs. It rides out a server restart: a failed request is
  repeated with backoff for up to `retry_seconds` (default 5 minutes), one stderr line per retry,
  but only when the server cannot still be working on it: one caller never has two requests in flight;
  a malformed reply or a URL that is not http(s):// is an error naming the URL.
- `serve` / `python retriever.py serve` exposes a `BM25Retriever` through the same API, so several
  training ranks or nodes share one index (a listen backlog of 1024 for their simultaneous
  requests; bodies over --max-request-bytes get 413, a topk over --max-topk, default 100, gets 400;
  a client that hangs up costs one log line). Its command-line errors are one line, exit status 2.
  Both retrievers have the same `.search(queries, topk)`, which is all the rollout needs.

What it does not do: dense retrieval, stemming, stop words, phrase queries, incremental updates of
an index (rebuild it), or authentication (the server binds to loopback by default).

The analyzer (`tokenize`): lower-case, then every maximal run of word characters (regex `\\w+`:
Unicode letters, digits and the underscore) is a token; everything else separates tokens. No
stemming and no stop-word list, on purpose: the scores must be exactly reproducible with the
reference scorer given the same token lists, and a reader must be able to predict every token by
eye. (Search-R1's own BM25 uses Pyserini/Lucene's English analyzer with Porter stemming, so its
scores differ from these; only the API and the observation format are shared.)

BM25 as rank-bm25 computes it, for a query q = (q_1 .. q_m) (repeated words count once per
occurrence) and a passage d of |d| tokens, with N passages of average length avgdl:

    score(q, d) = sum_i idf(q_i) * tf(q_i, d) * (k1 + 1) / (tf(q_i, d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t)      = log(N - n(t) + 0.5) - log(n(t) + 0.5)          n(t) = passages containing t
    idf(t)      = epsilon * mean_t'(idf(t'))   wherever the line above is negative, i.e. n(t) > N/2

(the mean runs over every word of the corpus vocabulary, negative values included). Words not in
the corpus contribute 0.

Usage:
    from retriever import BM25Retriever, HTTPRetriever, format_passages
    retriever = BM25Retriever.from_jsonl("corpus.jsonl")   # or HTTPRetriever("http://127.0.0.1:8000")
    hits = retriever.search(["who wrote hamlet", "capital of peru"], topk=3)  # one hit list per query
    observation = format_passages(hits[0])   # 'Doc 1(Title: Hamlet) Hamlet is a tragedy ...\\n...'
    retriever = BM25Retriever.load("wiki18-index")         # an index built once by `retriever.py index`
    # shell: python retriever.py serve --corpus corpus.jsonl --port 8000
    #        python retriever.py index --corpus wiki-18.jsonl --out wiki18-index
    #        python retriever.py serve --index wiki18-index --port 8000
"""
import argparse
import bisect
import errno
import glob
import gzip
import http.client
import json
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from array import array
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

_WORD = re.compile(r"\w+")

# search() scores queries together in blocks of (rows, N) float64 of at most this many bytes: the
# postings are scattered into the block, which is fastest while it fits the CPU's L2 cache.
_BLOCK_BYTES = 1 << 20


def tokenize(text: str) -> list[str]:
    """The BM25 analyzer: lower-case, split into `\\w+` runs. 'Who wrote "Hamlet"?' -> ['who', 'wrote', 'hamlet']."""
    return _WORD.findall(text.lower())


# ----------------------------------------------------------------------------------------------
# Progress of long work (indexing wiki-18 takes ~20 minutes)

_PROGRESS_DELAY = 2.0    # seconds of work before anything is shown: small corpora stay quiet
_PROGRESS_EVERY = 30.0   # seconds between the progress lines printed when tqdm is not installed
_PROGRESS_BATCH = 4096   # passages counted between updates (an update per passage would cost seconds)


class _Progress:
    """Progress on stderr: a tqdm bar (imported lazily, so this module needs only numpy), or without
    tqdm a line every _PROGRESS_EVERY seconds; nothing until the work has run _PROGRESS_DELAY
    seconds, and nothing at all when not `enabled`. update(n) adds n units done."""

    def __init__(self, description: str, total: int | None = None, unit: str = "passages", enabled: bool = True):
        self.description, self.total, self.unit, self.enabled, self.done = description, total, unit, enabled, 0
        self._started = self._printed = time.monotonic()
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            # a log file (not a terminal) gets a line every _PROGRESS_EVERY s, not one a second
            self._bar = tqdm(total=total, desc=f"retriever: {description}", unit="B" if unit == "bytes" else f" {unit}",
                             unit_scale=True, unit_divisor=1024 if unit == "bytes" else 1000, delay=_PROGRESS_DELAY,
                             mininterval=1.0 if sys.stderr.isatty() else _PROGRESS_EVERY, file=sys.stderr)

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if self.enabled and now - self._started >= _PROGRESS_DELAY and now - self._printed >= _PROGRESS_EVERY:
            self._printed = now
            of = "" if self.total is None else f" of {self.total:,}"
            print(f"retriever: {self.description}: {self.done:,}{of} {self.unit} in {now - self._started:.0f} s",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# ----------------------------------------------------------------------------------------------
# Corpus rows


def _row_problem(row) -> str | None:
    """Why `row` is not a corpus row {"id": str, "contents": str, ...}, or None if it is one."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    for key in ("id", "contents"):
        if key not in row:
            return f'missing "{key}"'
        if not isinstance(row[key], str):
            return f'"{key}" must be a string, got {type(row[key]).__name__}'
    return None


def _text_lines(path: str):
    """Yields (line number, text) for each line of a UTF-8 file, gzip-compressed if the name ends in
    .gz. Bytes are decoded line by line (as data.read_jsonl does), so a bad byte, a Latin-1 file or
    a gzip file without the .gz name is an error naming the file and line."""
    lineno = 0
    try:
        with (gzip.open if path.lower().endswith(".gz") else open)(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    gz = " (this is gzip data: name the file .gz)" if raw.startswith(b"\x1f\x8b") else ""
                    raise ValueError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start}){gz}") from None
                yield lineno, line
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # not gzip, truncated, or damaged
        raise ValueError(f"{path}:{lineno + 1}: not a readable gzip file ({e})") from None


def corpus_rows(path: str, progress: bool = False):
    """Yields each row of a JSONL corpus (UTF-8; gzip if named .gz), one
    {"id": str, "contents": "title\ntext"} object per line (extra keys are kept; blank lines are
    skipped), checking each as it goes: ValueError naming the file and line of the first bad row,
    byte or duplicate id, or the file if it holds no passages. `progress`: count the rows read on
    stderr if it takes a while (see _Progress)."""
    line_of_id = {}
    bar = _Progress(f"reading {path}", enabled=progress)
    for lineno, line in _text_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        problem = _row_problem(row)
        if problem is not None:
            raise ValueError(f"{path}:{lineno}: {problem}")
        if row["id"] in line_of_id:
            raise ValueError(f"{path}:{lineno}: duplicate id {row['id']!r} (first on line {line_of_id[row['id']]})")
        line_of_id[row["id"]] = lineno
        if len(line_of_id) % _PROGRESS_BATCH == 0:
            bar.update(_PROGRESS_BATCH)
        yield row
    bar.update(len(line_of_id) - bar.done)
    bar.close()
    if not line_of_id:
        raise ValueError(f"{path}: the corpus holds no passages")


def load_corpus(path: str, progress: bool = False) -> list[dict]:
    """Every row of a JSONL corpus (see corpus_rows), in file order."""
    return list(corpus_rows(path, progress))


# ----------------------------------------------------------------------------------------------
# BM25 math: small pure functions, each written as the formula in the module docstring.


def bm25_idf(doc_freq: np.ndarray, n_docs: int, epsilon: float) -> np.ndarray:
    """idf(t) = log(N - n + 0.5) - log(n + 0.5), negatives replaced by epsilon * (mean idf).

    doc_freq: (V,) passages containing each word, in order of first appearance in the corpus.
    math.log and a left-to-right sum in that order (not np.log / np.sum, which round differently in
    the last bit) make the result bit-identical to the reference's."""
    raw = [math.log(n_docs - n + 0.5) - math.log(n + 0.5) for n in doc_freq.tolist()]
    total = 0.0
    for value in raw:
        total += value
    floor = epsilon * (total / len(raw))
    idf = np.array(raw, dtype=np.float64)  # (V,)
    idf[idf < 0] = floor
    return idf


def bm25_length_norm(doc_len: np.ndarray, k1: float, b: float) -> np.ndarray:
    """K(d) = k1 * (1 - b + b * |d| / avgdl) per passage: (N,) int -> (N,) float64."""
    avgdl = int(doc_len.sum()) / len(doc_len)
    return k1 * (1 - b + b * doc_len / avgdl)


def bm25_term_weight(tf: np.ndarray, norm: np.ndarray, k1: float) -> np.ndarray:
    """tf * (k1 + 1) / (tf + K(d)): a posting's score per unit of idf. (P,) int, (P,) float -> (P,)."""
    return tf * (k1 + 1) / (tf + norm)


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k highest scores of each row, best first, equal scores in corpus (column) order:
    (G, N) -> passage indices (G, k) and their scores (G, k). Overwrites `scores`.

    k passes of argmax along the rows, which returns the *first* index of a row's maximum, so ties
    come out in corpus order with no extra work; each found maximum is set to -inf for the next
    pass. O(k N) per row with a tiny constant: ~50x faster than np.partition for k = 3 (measured
    at N = 100k). Past k = 64 one stable sort per row is cheaper."""
    k = min(k, scores.shape[1])
    if k > 64:
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (G, k)
        return best, np.take_along_axis(scores, best, axis=1)
    rows = np.arange(len(scores))
    best = np.empty((len(scores), k), dtype=np.int64)  # (G, k)
    values = np.empty((len(scores), k), dtype=np.float64)  # (G, k)
    for j in range(k):
        best[:, j] = scores.argmax(axis=1)
        values[:, j] = scores[rows, best[:, j]]
        scores[rows, best[:, j]] = -np.inf
    return best, values


# ----------------------------------------------------------------------------------------------
# Building the inverted index (for BM25Retriever(passages) and for `index`)

# Tokens sorted at a time while building: the chunk's sort needs ~30 bytes a token, so this bounds
# the build's working memory whatever the corpus size; each chunk's postings are then kept (5 bytes
# each; on disk when building an index directory) until all are placed.
_CHUNK_TOKENS = 1 << 23


def _chunk_postings(word_of_token: array, doc_len: array, first_doc: int) -> tuple:
    """The postings of a chunk of passages, sorted by (word, passage): (words present (W,), their
    posting counts (W,), passage of each posting (P,) int32, tf of each posting (P,) uint8 or wider).

    Sorting the keys word * n + passage makes equal keys runs whose lengths are the term
    frequencies, and the run starts, in key order, are the postings in CSR order."""
    n = len(doc_len)
    key = np.frombuffer(word_of_token, dtype=np.int32).astype(np.int64)  # (T,) word id ...
    key *= n
    key += np.repeat(np.arange(n, dtype=np.int64), np.frombuffer(doc_len, dtype=np.int32))  # ... * n + passage
    key.sort()
    run_start = np.flatnonzero(np.diff(key, prepend=-1))  # (P,)
    tf = np.diff(run_start, append=len(key))  # (P,)
    word, doc = np.divmod(key[run_start], n)  # (P,), (P,)
    del key, run_start
    word_start = np.flatnonzero(np.diff(word, prepend=-1))  # (W,)
    counts = np.diff(word_start, append=len(word))  # (W,)
    tf = tf.astype(np.min_scalar_type(int(tf.max(initial=0))))  # uint8 unless a word repeats > 255 times
    return word[word_start], counts, (doc + first_doc).astype(np.int32), tf


def _spill(directory: str | None, i: int, arrays: tuple) -> tuple:
    """Chunk i's arrays as they are, or with a directory saved there and memory-mapped back: the
    kept postings are then page cache the kernel can drop, not the build's own memory."""
    if directory is None:
        return arrays
    paths = [os.path.join(directory, f"chunk{i}.{j}.npy") for j in range(len(arrays))]
    for path, values in zip(paths, arrays):
        np.save(path, values)
    return tuple(np.load(path, mmap_mode="r") for path in paths)


def _empty(directory: str | None, name: str, dtype, shape: int | tuple) -> np.ndarray:
    """np.empty, or with a directory a memory-mapped `directory/name.npy` of that shape."""
    if directory is None:
        return np.empty(shape, dtype=dtype)
    return np.lib.format.open_memmap(os.path.join(directory, name + ".npy"), mode="w+", dtype=dtype,
                                     shape=shape if isinstance(shape, tuple) else (shape,))


def dense_words(doc_freq: np.ndarray, n_docs: int) -> np.ndarray:
    """The words in more than half of the passages, (F,) ids ascending: exactly the words whose idf
    is on the epsilon floor (log(N - n + 0.5) - log(n + 0.5) < 0 <=> n > N / 2). In real text these
    are "the", "of", "is", ... : few words, but the bulk of a question's postings."""
    return np.flatnonzero(2 * np.asarray(doc_freq) > n_docs)


def dense_term_rows(words: np.ndarray, start: np.ndarray, doc: np.ndarray, tf: np.ndarray, idf: np.ndarray,
                    norm: np.ndarray, k1: float, out: np.ndarray | None = None) -> np.ndarray:
    """(F, N) float64: row f is the BM25 term of word words[f] for every passage,
    idf * tf (k1 + 1) / (tf + K(d)) with tf = 0 (a term of +-0.0) where the word is absent -- the
    very vector rank_bm25 adds for the word, with the same float operations, so adding the row is
    adding the word, bit for bit. Written into `out` if given."""
    out = np.empty((len(words), len(norm))) if out is None else out
    for f, t in enumerate(words.tolist()):
        tf_row = np.zeros(len(norm), dtype=tf.dtype)  # (N,)
        tf_row[doc[start[t]:start[t + 1]]] = tf[start[t]:start[t + 1]]
        out[f] = idf[t] * bm25_term_weight(tf_row, norm, k1)
    return out


def build_index(texts, k1: float, b: float, epsilon: float, directory: str | None = None, source: str = "BM25Retriever",
                progress: bool = False, total: int | None = None) -> dict:
    """The index of an iterable of passage texts, in the layout BM25Retriever documents:
    {"vocab", "start", "doc", "tf", "idf", "norm", "dense_words", "dense"}. Tokens are sorted
    _CHUNK_TOKENS at a time and each chunk's postings finally scattered into place; with a
    `directory`, the chunks and then doc, tf and dense are written there (doc.npy / tf.npy /
    dense.npy, memory-mapped while they are filled) instead of held in memory. `source` names the
    corpus in errors. `progress`: show on stderr, if the build takes a while, the passages indexed
    (of `total`, when known) and then the chunks placed."""
    # Word ids in order of first appearance (the reference's vocabulary order, which its mean idf
    # sums in). A defaultdict whose factory is its own len() hands a new word the next id on first
    # lookup, so map() assigns ids without a Python-level call per token (2x faster).
    vocab = defaultdict()
    vocab.default_factory = vocab.__len__
    doc_len, word_of_token, chunks, chunk_first = array("i"), array("i"), [], 0  # doc_len: (N,)
    bar = _Progress("indexing", total=total, enabled=progress)
    for text in texts:
        words = tokenize(text)
        doc_len.append(len(words))
        word_of_token.extend(map(vocab.__getitem__, words))
        if len(word_of_token) >= _CHUNK_TOKENS:
            chunks.append(_spill(directory, len(chunks), _chunk_postings(word_of_token, doc_len[chunk_first:], chunk_first)))
            word_of_token, chunk_first = array("i"), len(doc_len)
        if len(doc_len) % _PROGRESS_BATCH == 0:
            bar.update(_PROGRESS_BATCH)
    chunks.append(_spill(directory, len(chunks), _chunk_postings(word_of_token, doc_len[chunk_first:], chunk_first)))
    bar.update(len(doc_len) - bar.done)
    bar.close()
    del word_of_token
    vocab.default_factory = None  # from here on, an unknown word is a KeyError, not a new id
    if not doc_len:
        raise ValueError(f"{source}: the corpus holds no passages")
    if not vocab:
        raise ValueError(f"{source}: no passage contains a word, so there is nothing to index")

    doc_freq = np.zeros(len(vocab), dtype=np.int64)  # (V,) each posting is one passage
    for words, counts, _, _ in chunks:
        doc_freq[words] += counts
    start = np.concatenate([[0], np.cumsum(doc_freq)])  # (V + 1,)
    doc = _empty(directory, "doc", np.int32, int(start[-1]))  # (P,)
    tf = _empty(directory, "tf", np.result_type(*[chunk[3] for chunk in chunks]), int(start[-1]))  # (P,)
    cursor = start[:-1].copy()  # (V,) where each word's next postings go: chunk after chunk, so
    bar = _Progress("placing postings", total=len(chunks), unit="chunks", enabled=progress)
    while chunks:               # a word's postings stay in corpus order
        words, counts, chunk_doc, chunk_tf = chunks.pop(0)
        at = np.repeat(cursor[words] - (np.cumsum(counts) - counts), counts) + np.arange(len(chunk_doc))  # (P_chunk,)
        doc[at], tf[at] = chunk_doc, chunk_tf
        cursor[words] += counts
        bar.update(1)
    bar.close()
    for spilled in glob.glob(os.path.join(directory, "chunk*.npy")) if directory else []:
        os.remove(spilled)
    doc_len = np.frombuffer(doc_len, dtype=np.int32)
    idf, norm = bm25_idf(doc_freq, len(doc_len), epsilon), bm25_length_norm(doc_len, k1, b)
    dense = dense_words(doc_freq, len(doc_len))
    rows = dense_term_rows(dense, start, doc, tf, idf, norm, k1,
                           out=_empty(directory, "dense", np.float64, (len(dense), len(doc_len))))
    return {"vocab": vocab, "start": start, "doc": doc, "tf": tf, "idf": idf, "norm": norm,
            "dense_words": dense, "dense": rows}


# ----------------------------------------------------------------------------------------------
# In-process retriever


class BM25Retriever:
    """Okapi BM25 over corpus rows through a CSR inverted index, built in memory from the rows or
    loaded (memory-mapped) from an index directory written by `write_index`.

    Index layout, for a vocabulary of V words and P (word, passage) postings:
        postings of word t are positions  _start[t] : _start[t + 1]    _start:  (V + 1,) int64
        passage index of each posting     _doc[p]                       _doc:    (P,) int32
        how often the word is in it       _tf[p]                        _tf:     (P,) uint8 (wider if needed)
    plus idf per word (_idf: (V,)) and K(d) per passage (_norm: (N,)), and _vocab {word: t}. Within
    a word, postings are in corpus order. The few words in more than half of the passages (the
    words on the epsilon floor: "the", "of", "is", ...) also have their finished term for every
    passage, a dense row of _dense: (F, N) float64, word _dense_words[f]: adding a row is one pass
    over N contiguous floats instead of scattering as many postings. In real questions these words
    hold most of the postings; the rows cost 8 N bytes each (F = 8 for 10k Wikipedia leads, about
    a quarter of the postings' bytes). bench/bench_retriever.py measures the trade, and the other
    one: the finished float64 weight stored for every posting (8 bytes instead of 1).

    A build or load that runs longer than _PROGRESS_DELAY (2 s) shows its progress on stderr
    (progress=False: never)."""

    def __init__(self, passages: list[dict], k1: float = 1.5, b: float = 0.75, epsilon: float = 0.25,
                 progress: bool = True):
        self.passages = list(passages)
        # float(): an int k1 would make tf * (k1 + 1) integer arithmetic on the uint8 tf array.
        self.k1, self.b, self.epsilon = float(k1), float(b), float(epsilon)
        self._index_of_id = {}
        for i, row in enumerate(self.passages):
            problem = _row_problem(row)
            if problem is not None:
                raise ValueError(f"BM25Retriever: passages[{i}]: {problem}")
            if row["id"] in self._index_of_id:
                raise ValueError(f"BM25Retriever: passages[{i}]: duplicate id {row['id']!r} "
                                 f"(first at passages[{self._index_of_id[row['id']]}])")
            self._index_of_id[row["id"]] = i
        self._adopt(build_index((row["contents"] for row in self.passages), self.k1, self.b, self.epsilon,
                                progress=progress, total=len(self.passages)))

    @classmethod
    def from_jsonl(cls, path: str, progress: bool = True, **kwargs) -> "BM25Retriever":
        """BM25Retriever(load_corpus(path), **kwargs), showing the progress of both if they take a while."""
        return cls(load_corpus(path, progress), progress=progress, **kwargs)

    @classmethod
    def load(cls, path: str, verify: bool = True, progress: bool = True) -> "BM25Retriever":
        """The retriever of an index directory written by `write_index` (`python retriever.py index`):
        its arrays and passages are memory-mapped, not read into memory, and processes on one machine
        share the pages. k1, b and epsilon are the index's (they are fixed when it is built).
        get(id) returns {"id", "contents"} only: extra keys of the corpus rows are not stored.
        ValueError naming the file for anything that is not a complete, undamaged index of this
        version: every file's size is checked against meta.json, and with `verify` its CRC-32 too,
        which reads every byte once (1-3.5 GiB/s from the page cache on this 2-core machine,
        depending on its load: ~7-25 s for wiki-18's ~25 GiB; longer from a cold disk; shown on
        stderr with `progress`), so bit rot is found at load, not as a wrong passage or an
        IndexError later. verify=False skips it (for an index on a disk you trust)."""
        meta, arrays, vocab = _read_index(path, verify, progress)
        self = cls.__new__(cls)
        self.k1, self.b, self.epsilon = meta["k1"], meta["b"], meta["epsilon"]
        self.passages = self._index_of_id = _StoredPassages(arrays)
        if "dense" not in arrays:  # an index written before the dense rows existed: made here, in memory
            arrays["dense_words"] = dense_words(np.diff(arrays["start"]), len(arrays["norm"]))
            arrays["dense"] = dense_term_rows(arrays["dense_words"], arrays["start"], arrays["doc"], arrays["tf"],
                                              arrays["idf"], arrays["norm"], self.k1)
        self._adopt({"vocab": vocab, **arrays})
        return self

    def _adopt(self, index: dict):
        self._vocab, self._start, self._doc, self._tf, self._idf, self._norm, self._dense_words, self._dense = (
            index[key] for key in ("vocab", "start", "doc", "tf", "idf", "norm", "dense_words", "dense"))
        self._dense_row = dict(zip(self._dense_words.tolist(), range(len(self._dense_words))))  # {t: f}

    def __len__(self) -> int:
        return len(self.passages)

    def get(self, id: str) -> dict:
        """The corpus row with this id. KeyError if there is none."""
        i = self._index_of_id.get(id)
        if i is None:
            raise KeyError(f"no passage with id {id!r} in the corpus")
        return self.passages[i]

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every passage for `query`: (N,) float64, equal to rank_bm25's get_scores."""
        return self._score_block([query])[0]

    def search(self, queries: list[str], topk: int = 3) -> list[list[dict]]:
        """Top-`topk` hits {"id", "contents", "score"} per query, best first, ties in corpus order.
        An empty or whitespace-only query gets no hits; a query of unknown words gets the first
        `topk` passages with score 0.0. Queries are scored together in blocks of `rows` queries
        whose (rows, N) scores fit _BLOCK_BYTES."""
        _check_search_args(queries, topk)
        results = [[] for _ in queries]
        asked = [i for i, query in enumerate(queries) if query.strip()]
        rows = max(1, _BLOCK_BYTES // (8 * len(self)))
        for first in range(0, len(asked), rows):
            block = asked[first:first + rows]
            best, values = top_k(self._score_block([queries[i] for i in block]), topk)  # (G, k), (G, k)
            for i, passages, scores in zip(block, best.tolist(), values.tolist()):
                results[i] = [self._hit(p, s) for p, s in zip(passages, scores)]
        return results

    def _hit(self, i: int, score: float) -> dict:
        row = self.passages[i]
        return {"id": row["id"], "contents": row["contents"], "score": score}

    def _postings(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Word t's postings: passages (P_t,) int32 and term frequencies (P_t,)."""
        first, end = self._start[t], self._start[t + 1]
        return self._doc[first:end], self._tf[first:end]

    def _score_block(self, queries: list[str]) -> np.ndarray:
        """BM25 scores of G queries against every passage: (G, N) float64, row g bit-identical to
        rank_bm25's get_scores(tokenize(queries[g])).

        The reference adds one term of the sum per query word, repeats included and in query order,
        to every passage; the same float operations in the same order give the same bits, and a
        passage a word misses gets +-0.0 there, which changes no sum. So each query's words are
        added in its order, in two parts:
        - the words before its first dense word (for content-word queries, all of them), for the
          whole block at once: their postings laid out one after another (copied slices: measured
          ~25% faster than gathering posting positions), each given its term, and one np.bincount
          into the block, which adds in array order, i.e. in query order for each passage;
        - then the remaining words, the j-th of every query at step j: a dense word's row is added
          to its query's row in one pass, and the other words' terms go into their cells at once
          (distinct cells: one word per query, one posting per passage)."""
        lead, rest = [], []  # (row, t) of the words before each query's first dense word; the others per query
        for row, query in enumerate(queries):
            words = [t for t in map(self._vocab.get, tokenize(query)) if t is not None]  # unknown words score 0
            cut = next((i for i, t in enumerate(words) if t in self._dense_row), len(words))
            lead += [(row, t) for t in words[:cut]]
            rest.append(words[cut:])
        if lead:
            cell, weight = self._block_terms(lead)
            scores = np.bincount(cell, weights=weight, minlength=len(queries) * len(self)).reshape(len(queries), -1)
        else:
            scores = np.zeros((len(queries), len(self)))  # (G, N)
        flat = scores.reshape(-1)  # a view: cell = row * N + passage
        for j in range(max(map(len, rest), default=0)):
            sparse = []
            for row, words in enumerate(rest):
                if j < len(words):
                    f = self._dense_row.get(words[j])
                    if f is None:
                        sparse.append((row, words[j]))
                    else:
                        scores[row] += self._dense[f]
            if sparse:
                cell, weight = self._block_terms(sparse)
                flat[cell] += weight
        return scores

    def _block_terms(self, pairs: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        """The BM25 terms of (row, word) pairs, their postings one after another: each term's cell
        in the flattened block, row * N + passage (P,) int64, and its value (P,) float64."""
        docs, tfs = zip(*(self._postings(t) for _, t in pairs))
        count = np.array([len(d) for d in docs])  # (M,) postings of each word, in order
        doc = np.concatenate(docs)  # (P,) their passages, word after word
        idf = np.repeat(self._idf[[t for _, t in pairs]], count)  # (P,)
        cell = doc + np.repeat(np.array([row for row, _ in pairs], dtype=np.int64) * len(self), count)
        return cell, idf * bm25_term_weight(np.concatenate(tfs), self._norm[doc], self.k1)


# ----------------------------------------------------------------------------------------------
# The index on disk: a directory of .npy arrays (memory-mappable), two UTF-8 blobs and meta.json


INDEX_FORMAT, INDEX_VERSION = "retriever.py BM25 index", 1
_BLOB_OFFSETS = {"ids": "id_offsets", "contents": "contents_offsets"}  # blob file -> its offsets array


def write_index(corpus: str, out: str, k1: float = 1.5, b: float = 0.75, epsilon: float = 0.25,
                progress: bool = True) -> dict:
    """Builds the BM25 index of a JSONL corpus into the new directory `out`, for BM25Retriever.load.

        meta.json               format, version, k1, b, epsilon, counts, and every other file's
                                size and CRC-32 (checked by load); written last
        vocab.txt               the words, one a line, in id order
        start, doc, tf, idf, norm .npy   the inverted index (BM25Retriever's layout)
        dense_words, dense .npy the dense rows of the words in more than half of the passages
        ids.bin, contents.bin   every passage's id and contents, UTF-8, one after another; passage i
        id_offsets.npy, ...     is ids.bin[id_offsets[i]:id_offsets[i + 1]] (N + 1,), and so on
        id_order.npy            passage indices sorted by id, for get(id) by binary search

    Everything is written into a temporary directory beside `out` and renamed to `out` when
    complete, so `out` is either absent or a whole index. Refuses an existing `out`. Memory: the
    vocabulary, the ids and one chunk's sort; the passages and each chunk's postings go to disk as
    they are made. A long build shows its progress on stderr (`progress`). Returns the metadata."""
    k1, b, epsilon = float(k1), float(b), float(epsilon)   # an int k1 would make the BM25 math integer
    if os.path.exists(out):
        raise FileExistsError(f"{out}: already exists; remove it or choose another --out")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(os.path.abspath(out)) + ".tmp-", dir=parent)
    try:
        ids, offsets = [], {"id": array("q", [0]), "contents": array("q", [0])}
        with open(os.path.join(tmp, "ids.bin"), "wb") as id_file, open(os.path.join(tmp, "contents.bin"), "wb") as text_file:
            def texts():  # streams the corpus: blobs written as the passages go by
                for row in corpus_rows(corpus):
                    ids.append(row["id"])
                    for key, file in (("id", id_file), ("contents", text_file)):
                        offsets[key].append(offsets[key][-1] + file.write(row[key].encode("utf-8", "surrogatepass")))
                    yield row["contents"]
            index = build_index(texts(), k1, b, epsilon, directory=tmp, source=corpus, progress=progress)
        index["doc"].flush(), index["tf"].flush(), index["dense"].flush()
        arrays = {"start": index["start"], "idf": index["idf"], "norm": index["norm"], "dense_words": index["dense_words"],
                  "id_offsets": np.frombuffer(offsets["id"], dtype=np.int64),
                  "contents_offsets": np.frombuffer(offsets["contents"], dtype=np.int64),
                  "id_order": np.array(sorted(range(len(ids)), key=ids.__getitem__), dtype=np.int64)}
        for name, values in arrays.items():
            np.save(os.path.join(tmp, name + ".npy"), values)
        with open(os.path.join(tmp, "vocab.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(index["vocab"]))  # a word is a \w+ run, so never holds a newline
        meta = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "k1": k1, "b": b,
                "epsilon": epsilon, "passages": len(ids), "words": len(index["vocab"]),
                "postings": len(index["doc"]), "tf_dtype": index["tf"].dtype.name, "dense_words": len(index["dense_words"]),
                "corpus": os.path.abspath(corpus),
                "files": _file_records(tmp, progress)}
        with open(os.path.join(tmp, "meta.json.tmp"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
        os.replace(os.path.join(tmp, "meta.json.tmp"), os.path.join(tmp, "meta.json"))  # the mark of a whole index
        del index
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def _file_crc32(path: str, bar: _Progress | None = None) -> str:
    """CRC-32 of a file's bytes, 8 hex digits. Read 1 MiB at a time, which stays in the CPU cache
    from the read to the CRC (1.0 GiB/s measured here under load, vs 0.55-0.99 with 16 MiB)."""
    crc, buffer = 0, bytearray(1 << 20)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            crc = zlib.crc32(view[:n], crc)
            if bar is not None:
                bar.update(n)
    return f"{crc:08x}"


def _file_records(directory: str, progress: bool) -> dict:
    """{name: {"bytes", "crc32"}} of every file in `directory`, for meta.json."""
    names = sorted(os.listdir(directory))
    sizes = {name: os.path.getsize(os.path.join(directory, name)) for name in names}
    bar = _Progress("checksums", total=sum(sizes.values()), unit="bytes", enabled=progress)
    records = {name: {"bytes": sizes[name], "crc32": _file_crc32(os.path.join(directory, name), bar)} for name in names}
    bar.close()
    return records


def _check_files(path: str, files, verify: bool, hint: str, progress: bool = False) -> None:
    """Every file meta.json lists has its recorded size, and with `verify` its recorded CRC-32:
    ValueError naming the first that does not (truncated, replaced or bit-rotten)."""
    if not isinstance(files, dict) or not all(isinstance(r, dict) and isinstance(r.get("bytes"), int)
                                              and isinstance(r.get("crc32"), str) for r in files.values()):
        raise ValueError(f"{path}/meta.json: \"files\" is not {{name: {{\"bytes\", \"crc32\"}}}}; {hint}")
    for name, record in files.items():
        file = os.path.join(path, name)
        size = os.path.getsize(file) if os.path.isfile(file) else None
        if size != record["bytes"]:
            raise ValueError(f"{file}: {'missing' if size is None else f'{size} bytes'}, expected "
                             f"{record['bytes']} (meta.json): truncated or replaced; {hint}")
    bar = _Progress(f"verifying {path}", total=sum(r["bytes"] for r in files.values()), unit="bytes",
                    enabled=progress and verify)
    for name, record in files.items() if verify else ():
        file = os.path.join(path, name)
        crc = _file_crc32(file, bar)
        if crc != record["crc32"]:
            raise ValueError(f"{file}: damaged: its CRC-32 is {crc}, meta.json records {record['crc32']} "
                             f"(bit rot or a bad copy); {hint}")
    bar.close()


def _read_index(path: str, verify: bool = True, progress: bool = False) -> tuple[dict, dict, dict]:
    """(meta, {name: memory-mapped array or blob}, vocab) of an index directory, checked against
    meta.json: every file's size (and with `verify` its CRC-32), then the dtype and length of every
    array and the offsets ending at the blob sizes. ValueError naming the file when it is not a
    complete, undamaged index. An index written before checksums were recorded gets a warning."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such index directory (build one with `python retriever.py index`)")
    hint = "rebuild it with `python retriever.py index --corpus C.jsonl --out DIR`"
    try:
        with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: not a BM25 index: no meta.json (an interrupted build leaves none); {hint}") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}/meta.json: unreadable ({e}); {hint}") from None
    if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path}: not a BM25 index written by retriever.py (meta.json has no format {INDEX_FORMAT!r})")
    if meta.get("version") != INDEX_VERSION:
        raise ValueError(f"{path}: index version {meta.get('version')!r}, this retriever.py reads version {INDEX_VERSION}; {hint}")
    missing = [key for key in ("k1", "b", "epsilon", "passages", "words", "postings", "tf_dtype") if key not in meta]
    if missing:
        raise ValueError(f"{path}/meta.json: lacks {', '.join(missing)}; {hint}")
    if "files" in meta:
        _check_files(path, meta["files"], verify, hint, progress)
    else:
        print(f"retriever: warning: {path} records no file sizes or checksums (it was built by an older "
              f"retriever.py), so a damaged file may go unnoticed; {hint}", file=sys.stderr, flush=True)
    n, v, p, n_dense = meta["passages"], meta["words"], meta["postings"], meta.get("dense_words")
    arrays, expected = {}, {"start": (np.int64, (v + 1,)), "doc": (np.int32, (p,)), "tf": (meta["tf_dtype"], (p,)),
                            "idf": (np.float64, (v,)), "norm": (np.float64, (n,)), "id_offsets": (np.int64, (n + 1,)),
                            "contents_offsets": (np.int64, (n + 1,)), "id_order": (np.int64, (n,))}
    if n_dense is not None:  # an index written before the dense rows existed has none: BM25Retriever.load makes them
        expected.update({"dense_words": (np.int64, (n_dense,)), "dense": (np.float64, (n_dense, n))})
    for name, (dtype, shape) in expected.items():
        file = os.path.join(path, name + ".npy")
        try:
            arrays[name] = np.load(file, mmap_mode="r")
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f"{file}: missing or unreadable ({type(e).__name__}: {e}); {hint}") from None
        if (arrays[name].dtype, arrays[name].shape) != (np.dtype(dtype), shape):
            raise ValueError(f"{file}: {arrays[name].dtype} {arrays[name].shape}, expected {np.dtype(dtype)} {shape} "
                             f"from meta.json; {hint}")
    for blob in _BLOB_OFFSETS:
        file, end = os.path.join(path, blob + ".bin"), int(arrays[_BLOB_OFFSETS[blob]][-1])
        size = os.path.getsize(file) if os.path.isfile(file) else None
        if size != end:
            raise ValueError(f"{file}: {'missing' if size is None else f'{size} bytes'}, expected {end}; {hint}")
        arrays[blob] = np.memmap(file, dtype=np.uint8, mode="r") if size else np.zeros(0, dtype=np.uint8)
    if arrays["start"][0] != 0 or arrays["start"][-1] != p:
        raise ValueError(f"{path}/start.npy: does not span the {p} postings; {hint}")
    try:
        with open(os.path.join(path, "vocab.txt"), encoding="utf-8") as f:
            words = f.read().split("\n")
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}/vocab.txt: missing or unreadable ({e}); {hint}") from None
    if len(words) != v:
        raise ValueError(f"{path}/vocab.txt: {len(words)} words, expected {v}; {hint}")
    return meta, arrays, dict(zip(words, range(len(words))))


class _StoredPassages:
    """The passages of a loaded index, decoded from the memory-mapped blobs on demand: a sequence
    of {"id", "contents"} dicts, and get(id) -> passage index or None (binary search over id_order)."""

    def __init__(self, arrays: dict):
        self._arrays = arrays

    def __len__(self) -> int:
        return len(self._arrays["id_order"])

    def _text(self, blob: str, i: int) -> str:
        offsets = self._arrays[_BLOB_OFFSETS[blob]]
        return self._arrays[blob][offsets[i]:offsets[i + 1]].tobytes().decode("utf-8", "surrogatepass")

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"passage index {i} out of range for {len(self)} passages")
        i %= len(self)
        return {"id": self._text("ids", i), "contents": self._text("contents", i)}

    def get(self, id: str) -> int | None:
        if not isinstance(id, str):
            return None
        order = self._arrays["id_order"]  # str order is code point order, as the build sorted them
        at = bisect.bisect_left(order, id, key=lambda i: self._text("ids", i))
        return int(order[at]) if at < len(order) and self._text("ids", order[at]) == id else None


def _check_search_args(queries, topk) -> None:
    """The one contract of every retriever's .search: a list of strings and a positive topk."""
    if isinstance(queries, str):
        raise TypeError("search() takes a list of queries; wrap a single query as [query]")
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
        raise ValueError(f"search(): topk must be a positive integer, got {topk!r}")
    for query in queries:
        if not isinstance(query, str):
            raise TypeError(f"search(): each query must be a string, got {type(query).__name__}")


def format_passages(hits: list[dict]) -> str:
    """The observation text for one query's hits (Search-R1's format, byte for byte):
    [{"contents": "Hamlet\\nA tragedy."}, ...] -> 'Doc 1(Title: Hamlet) A tragedy.\\nDoc 2(...'
    Title = first line of `contents`, text = the remaining lines joined by "\\n". No hits -> ""."""
    lines = []
    for rank, hit in enumerate(hits, start=1):
        title, _, text = hit["contents"].partition("\n")
        lines.append(f"Doc {rank}(Title: {title}) {text}\n")
    return "".join(lines)


# ----------------------------------------------------------------------------------------------
# Search-R1 retrieval API: client


class HTTPRetriever:
    """Client for a Search-R1 retrieval server (its e5 + FAISS server, or `serve` below).

    Request:  POST {url}/retrieve  {"queries": [...], "topk": k, "return_scores": true}
    Reply:    {"result": [[{"document": {"id", "contents", ...}, "score": s}, ...] per query]}
    Standard library only.

    Faults. One caller never has two requests in flight: a request is only ever sent again when the
    server cannot still be working on the first one -- the connection was refused or reset, or the
    server answered HTTP 5xx (but 504), 408 or 429. Those are repeated until one succeeds or
    `retry_seconds` have passed since the first attempt, so a server restart is ridden out: waits of
    `backoff` seconds, doubling up to `max_backoff`, each announced by one line on stderr naming the
    URL, the error and the budget left. Then RuntimeError naming the URL and the budget. `retries`,
    if given, also caps the number of repeats. `timeout` is None by default: a request waits for its
    reply however long the server takes, as Search-R1's `requests.post` does (no timeout,
    search_r1/llm_agent/generation.py:450-458, `_batch_search`). With a `timeout`, a request that gets
    no reply in time (or HTTP 504) fails at once (TimeoutError), naming the URL and the number of
    queries, and is not sent again: the server may still be searching it, and a second request beside it is the
    concurrent load that Search-R1's one driver never puts on its e5 FAISS server. (Waiting on
    instead is what no timeout already does.) Anything else fails at once too, naming the URL: a URL
    that is not http(s):// (at construction), HTTP 4xx (a request the server will never accept;
    with its message), or a reply that is not the API's JSON. Calls from several threads take turns
    (a lock), so one client never overlaps itself either."""

    def __init__(self, url: str, topk: int = 3, timeout: float | None = None, retry_seconds: float = 300.0,
                 backoff: float = 0.5, max_backoff: float = 10.0, retries: int | None = None):
        for name, value, positive in ((("timeout", timeout, True),) if timeout is not None else ()) + (
                                      ("retry_seconds", retry_seconds, False),
                                      ("backoff", backoff, False), ("max_backoff", max_backoff, True)):
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not number or value < 0 or (positive and value == 0):
                raise ValueError(f"HTTPRetriever: {name} must be a finite number of seconds "
                                 f"{'> 0' if positive else '>= 0'}, got {value!r}")
        if retries is not None and (not isinstance(retries, int) or isinstance(retries, bool) or retries < 0):
            raise ValueError(f"HTTPRetriever: retries must be None or an integer >= 0, got {retries!r}")
        parts = urllib.parse.urlsplit(url)
        try:
            parts.port  # raises for a port out of range or not a number
        except ValueError as e:
            raise ValueError(f"HTTPRetriever: {url!r}: {e}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"HTTPRetriever: {url!r} is not an http:// or https:// URL with a host "
                             f"(e.g. http://127.0.0.1:8000/retrieve)")
        base = url.rstrip("/")
        self.url = base if base.endswith("/retrieve") else base + "/retrieve"
        self.topk, self.timeout, self.retry_seconds, self.retries = topk, timeout, retry_seconds, retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self._one_at_a_time = threading.Lock()
        # A proxy from the environment (http_proxy) cannot reach this machine's loopback server.
        loopback = parts.hostname in ("localhost", "127.0.0.1", "::1")
        self._opener = urllib.request.build_opener(*([urllib.request.ProxyHandler({})] if loopback else []))

    def search(self, queries: list[str], topk: int | None = None) -> list[list[dict]]:
        """Same contract as BM25Retriever.search, except that every query is sent, blank ones too:
        Search-R1's rollout posts each `<search>`'s stripped text whatever it is
        (search_r1/llm_agent/generation.py, lines 370 and 450–458), and its e5 server answers a blank
        query with passages like any other, so a model searching "" reads what it would read there.
        (The local BM25Retriever returns [] for a blank query: no word of it can match.)"""
        topk = self.topk if topk is None else topk
        _check_search_args(queries, topk)
        if not queries:
            return []
        reply = self._post({"queries": list(queries), "topk": topk, "return_scores": True})
        per_query = reply.get("result") if isinstance(reply, dict) else None
        if not isinstance(per_query, list) or len(per_query) != len(queries):
            raise RuntimeError(f"retrieval server {self.url}: expected {{\"result\": [...]}} with "
                               f"{len(queries)} hit lists, got {str(reply)[:300]}")
        for j, items in enumerate(per_query):
            if not isinstance(items, list):
                raise RuntimeError(f"retrieval server {self.url}: \"result\"[{j}] must be a list of hits, "
                                   f"got {str(items)[:300]}")
        return [[self._hit(item) for item in items] for items in per_query]

    def _hit(self, item) -> dict:
        """{"document": {...}, "score": s} -> {"id", "contents", "score"}. A bare document (a server
        that ignores return_scores) gets score None; a missing id (Search-R1's BM25) is None."""
        document, score = (item["document"], item.get("score")) if isinstance(item, dict) and "document" in item else (item, None)
        if not isinstance(document, dict) or not isinstance(document.get("contents"), str):
            raise RuntimeError(f"retrieval server {self.url}: a hit has no \"contents\" string: {str(item)[:300]}")
        if score is not None and (not isinstance(score, (int, float)) or isinstance(score, bool)):
            raise RuntimeError(f"retrieval server {self.url}: a hit's \"score\" is not a number: {str(item)[:300]}")
        return {"id": document.get("id"), "contents": document["contents"], "score": score}

    def _post(self, payload: dict) -> dict:
        """The decoded reply to one request, repeated as the class docstring says."""
        body = json.dumps(payload).encode("utf-8")
        with self._one_at_a_time:
            return self._post_alone(body, len(payload.get("queries", ())))

    def _post_alone(self, body: bytes, n_queries: int) -> dict:
        started = time.monotonic()
        wait, attempts = self.backoff, 0
        while True:
            attempts += 1
            reply, error = self._attempt(body, n_queries)
            if error is None:
                return reply
            left = started + self.retry_seconds - time.monotonic()
            if left <= 0 or (self.retries is not None and attempts > self.retries):
                cap = "" if self.retries is None else f", retries={self.retries}"
                raise RuntimeError(f"retrieval server {self.url}: no answer after {attempts} attempt{'s' * (attempts > 1)} in "
                                   f"{time.monotonic() - started:.1f} s (retry budget: retry_seconds="
                                   f"{self.retry_seconds:g}{cap}); last error: {error}")
            pause = min(wait, left)
            print(f"retriever: {self.url}: {error}; retrying in {pause:.3g} s "
                  f"({left:.0f} s of the {self.retry_seconds:g} s retry budget left)", file=sys.stderr, flush=True)
            time.sleep(pause)
            wait = min(2 * wait, self.max_backoff)

    def _attempt(self, body: bytes, n_queries: int) -> tuple[dict | None, str | None]:
        """(decoded reply, None), or (None, why) for a failure after which the server holds no work of
        this request (worth repeating); raises for the rest, a timeout among them."""
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        try:
            # urllib's default (a socket without a timeout) when self.timeout is None
            opened = self._opener.open(request, **({} if self.timeout is None else {"timeout": self.timeout}))
            with opened as response:
                text = response.read()
        except urllib.error.HTTPError as e:
            if e.code == 504:                # a proxy gave up on the server, which may still be searching
                self._timed_out(n_queries, "HTTP 504 (gateway timeout)")
            if e.code < 500 and e.code not in (408, 429):  # the server will never accept this request
                raise RuntimeError(f"retrieval server {self.url} rejected the request: HTTP {e.code}: "
                                   f"{e.read()[:500].decode('utf-8', 'replace')}") from None
            return None, f"HTTP {e.code}"
        except (OSError, http.client.HTTPException) as e:  # URLError: refused, reset, timeout, ...
            cause = e.reason if isinstance(e, urllib.error.URLError) and isinstance(e.reason, BaseException) else e
            if isinstance(cause, TimeoutError):  # socket.timeout is TimeoutError since Python 3.10
                self._timed_out(n_queries, f"{type(cause).__name__}: {cause}")
            return None, f"{type(cause).__name__}: {cause}"
        try:
            return json.loads(text), None
        except ValueError:  # not JSON, or not UTF-8
            raise RuntimeError(f"retrieval server {self.url} replied with invalid JSON: {text[:300]!r}") from None

    def _timed_out(self, n_queries: int, error: str):
        # TimeoutError is an OSError: the command line prints it as one line (cli.USER_ERRORS)
        raise TimeoutError(f"retrieval server {self.url}: no reply to a batch of {n_queries} "
                           f"quer{'y' if n_queries == 1 else 'ies'} within the timeout of {self.timeout:g} s "
                           f"({error}); not sent again, since the server may still be searching it and a second "
                           f"request would run beside it: raise --retriever-timeout, or leave it unset to wait "
                           f"as Search-R1 does") from None


# ----------------------------------------------------------------------------------------------
# Which retriever a run uses

def make_retriever(corpus: str | None, url: str | None, topk: int = 3, index: str | None = None,
                   retry_seconds: float = 300.0, timeout: float | None = None):
    """BM25 over a JSONL corpus (built at start-up) or over an index built once (`retriever.py index`,
    memory-mapped), or a Search-R1 retrieval server (checked once, so a dead URL stops the run here
    with a clear message instead of deep inside the first rollout). A server that fails is retried,
    a line per retry, for up to `retry_seconds` — at start-up and on every later request alike, so
    a run rides out a server restart; `timeout` (None: wait however long) bounds one request, which
    then fails, never re-sent (HTTPRetriever)."""
    if sum(bool(x) for x in (corpus, url, index)) != 1:
        raise ValueError("give exactly one of --corpus FILE.jsonl[.gz], --index DIR or --retriever-url URL")
    if url:
        retriever = HTTPRetriever(url, topk=topk, timeout=timeout, retry_seconds=retry_seconds)
        try:
            retriever.search(["test"], topk=1)
        except RuntimeError as e:          # the budget ran out: a user's problem, said in one line
            raise ConnectionError(f"--retriever-url: {e}") from e
        return retriever
    return BM25Retriever.load(index) if index else BM25Retriever.from_jsonl(corpus)


# ----------------------------------------------------------------------------------------------
# Search-R1 retrieval API: server


class _RetrieveHandler(BaseHTTPRequestHandler):
    """POST /retrieve on a `server.retriever`. Bad requests get 400 {"error": "..."} (a topk over
    server.max_topk among them), a body over server.max_request_bytes 413 (without reading it)."""

    timeout = 60  # seconds a client may stall mid-request before its thread gives up on it

    def do_POST(self):
        if urllib.parse.urlsplit(self.path).path.rstrip("/") != "/retrieve":
            return self._reply(404, {"error": f"unknown path {self.path!r}; POST /retrieve"})
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            length = -1
        if length < 0:
            return self._reply(400, {"error": "request body must be JSON with a Content-Length header giving its size"})
        if length > self.server.max_request_bytes:
            return self._reply(413, {"error": f"request body of {length} bytes is over this server's limit of "
                                              f"{self.server.max_request_bytes} (serve --max-request-bytes)"})
        try:
            request = json.loads(self.rfile.read(length))
        except ValueError as e:  # not UTF-8 or not JSON
            return self._reply(400, {"error": f"request body must be JSON with a Content-Length: {e}"})
        problem = _request_problem(request)
        if problem is not None:
            return self._reply(400, {"error": problem})
        topk = request.get("topk") or min(3, self.server.max_topk)  # Search-R1: a missing or 0 topk is its default
        if topk > self.server.max_topk:  # a topk of 10**9 would send the whole corpus back
            return self._reply(400, {"error": f'"topk" {topk} is over this server\'s limit of {self.server.max_topk} '
                                              f"passages per query (serve --max-topk)"})
        try:
            results = self.server.retriever.search(request["queries"], topk=topk)
        except Exception as e:  # report it rather than drop the connection
            return self._reply(500, {"error": f"{type(e).__name__}: {e}"})
        if request.get("return_scores", False):
            payload = [[{"document": {"id": h["id"], "contents": h["contents"]}, "score": h["score"]} for h in hits]
                       for hits in results]
        else:
            payload = [[{"id": h["id"], "contents": h["contents"]} for h in hits] for hits in results]
        self._reply(200, {"result": payload})

    def _reply(self, status: int, payload: dict):
        body = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):  # one line per request would drown the training log
        pass


def _request_problem(request) -> str | None:
    """Why a decoded /retrieve body is not {"queries": [str, ...], "topk"?: int >= 0, "return_scores"?: bool}."""
    if not isinstance(request, dict):
        return "request body must be a JSON object"
    queries = request.get("queries")
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        return '"queries" must be a list of strings'
    topk = request.get("topk")
    if topk is not None and (not isinstance(topk, int) or isinstance(topk, bool) or topk < 0):
        return f'"topk" must be a non-negative integer, got {topk!r}'
    if not isinstance(request.get("return_scores", False), bool):
        return '"return_scores" must be true or false'
    return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # The listen backlog. A training cluster's ranks send their queries at the same moment, and
    # connections past a full backlog are reset: the default 5 reset 174 of 200 simultaneous
    # loopback clients. (The kernel caps it at net.core.somaxconn.)
    request_queue_size = 1024

    def handle_error(self, request, client_address):
        """A client that hangs up before its reply (it timed out, or was killed) is its own affair:
        one line, not the standard library's 25-line traceback. Anything else is a bug: traceback."""
        error = sys.exc_info()[1]
        if not isinstance(error, (ConnectionError, TimeoutError)):
            return super().handle_error(request, client_address)
        print(f"retriever: client {client_address[0]}:{client_address[1]} went away mid-request "
              f"({type(error).__name__})", file=sys.stderr, flush=True)


MAX_REQUEST_BYTES = 16 * 2**20   # the largest /retrieve body the server reads (a batch of queries is KBs)
# The most passages a query may ask for. Search-R1 trains and evaluates with topk 3 and its largest
# use is 10 (retrieve 10, rerank to 3); 100 leaves room for recall@100-style evaluation while a
# request can no longer ask for the whole corpus.
MAX_TOPK = 100


def make_server(retriever, host: str = "127.0.0.1", port: int = 8000, max_request_bytes: int = MAX_REQUEST_BYTES,
                max_topk: int = MAX_TOPK) -> ThreadingHTTPServer:
    """A threaded HTTP server answering POST /retrieve from `retriever` (anything with .search).
    Port 0 picks a free port: read it back from server.server_address[1]. A request body over
    max_request_bytes gets 413 instead of being read into memory; a topk over max_topk gets 400.
    OSError if the address cannot be bound (a busy port, an unknown host)."""
    for name, value in (("max_request_bytes", max_request_bytes), ("max_topk", max_topk)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"make_server: {name} must be a positive integer, got {value!r}")
    server = _Server((host, port), _RetrieveHandler)
    server.retriever, server.max_request_bytes, server.max_topk = retriever, max_request_bytes, max_topk
    return server


def serve(retriever, host: str = "127.0.0.1", port: int = 8000, max_request_bytes: int = MAX_REQUEST_BYTES,
          max_topk: int = MAX_TOPK):
    """Serves `retriever` over the Search-R1 API until interrupted (blocking)."""
    _serve_forever(make_server(retriever, host, port, max_request_bytes, max_topk))


def _serve_forever(server: ThreadingHTTPServer):
    host, port = server.server_address[:2]
    print(f"retriever: serving at http://{host}:{port}/retrieve", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, `error: ...`, exit status 2 (the usage is in --help)."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _int_at_least(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high], else a message saying so."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is not in [{low}, {high if high is not None else 'inf'}]")
        return value
    return parse


def main(argv=None):
    parser = _Parser(description="BM25 retrieval server speaking the Search-R1 API, and its index builder.")
    commands = parser.add_subparsers(dest="command", required=True)
    corpus_help = 'JSONL, one {"id", "contents": "title\\ntext"} per line'
    index_args = commands.add_parser("index", help="build a BM25 index directory once, for serve --index / BM25Retriever.load")
    index_args.add_argument("--corpus", required=True, help=corpus_help)
    index_args.add_argument("--out", required=True, help="the index directory to create (must not exist)")
    serve_args = commands.add_parser("serve", help="serve POST /retrieve from a JSONL corpus (indexed at start-up) or an index")
    source = serve_args.add_mutually_exclusive_group(required=True)
    source.add_argument("--corpus", help=corpus_help)
    source.add_argument("--index", help="an index directory written by `index` (its k1, b and epsilon are used)")
    serve_args.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines (no authentication)")
    serve_args.add_argument("--port", type=_int_at_least(0, 65535), default=8000, help="0 picks a free port")
    serve_args.add_argument("--max-request-bytes", type=_int_at_least(1), default=MAX_REQUEST_BYTES,
                            help="larger request bodies get HTTP 413 (default 16 MiB)")
    serve_args.add_argument("--no-verify", action="store_true",
                            help="with --index: skip the CRC-32 pass over its files (sizes are still checked)")
    serve_args.add_argument("--max-topk", type=_int_at_least(1), default=MAX_TOPK,
                            help=f"a larger topk gets HTTP 400 (default {MAX_TOPK}; Search-R1 uses 3, at most 10)")
    for command in (index_args, serve_args):
        command.add_argument("--k1", type=float, help="default 1.5")
        command.add_argument("--b", type=float, help="default 0.75")
        command.add_argument("--epsilon", type=float, help="default 0.25")
    args = parser.parse_args(argv)
    given = {k: v for k, v in (("k1", args.k1), ("b", args.b), ("epsilon", args.epsilon)) if v is not None}
    if args.command == "serve" and args.index and given:
        serve_args.error(f"--{'/--'.join(given)}: an index's parameters are fixed when it is built "
                         f"(see {args.index}/meta.json); give them to `index`")
    if args.command == "serve" and args.no_verify and not args.index:
        serve_args.error("--no-verify: only an --index is verified (a --corpus is indexed at start-up)")
    started, server = time.perf_counter(), None
    try:
        if args.command == "index":
            meta = write_index(args.corpus, args.out, **given)
            print(f"retriever: indexed {meta['passages']:,} passages ({meta['words']:,} words, {meta['postings']:,} "
                  f"postings) from {args.corpus} into {args.out} in {time.perf_counter() - started:.1f}s", file=sys.stderr)
            return
        try:  # bound before the build, so a busy port fails now and not after minutes of indexing
            server = make_server(None, args.host, args.port, args.max_request_bytes, args.max_topk)
        except OSError as e:
            busy = " (another server? --port 0 picks a free port)" if e.errno == errno.EADDRINUSE else ""
            parser.exit(2, f"error: cannot listen on {args.host}:{args.port}: {e.strerror or e}{busy}\n")
        server.retriever = (BM25Retriever.load(args.index, verify=not args.no_verify) if args.index
                            else BM25Retriever.from_jsonl(args.corpus, **given))
    except (OSError, ValueError) as e:  # a bad corpus or index: its message names the file
        parser.exit(2, f"error: {e}\n")
    except KeyboardInterrupt:
        parser.exit(130, "retriever: interrupted\n")
    finally:
        if server is not None and server.retriever is None:
            server.server_close()
    print(f"retriever: {'loaded' if args.index else 'indexed'} {len(server.retriever):,} passages from "
          f"{args.index or args.corpus} in {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)
    _serve_forever(server)


if __name__ == "__main__":
    main()
