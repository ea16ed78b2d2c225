"""Benchmark: retriever.BM25Retriever against rank_bm25.BM25Okapi (the reference), in one process.

For each corpus: build time (tokenising included, for both), ms per query (ours: a batched
`search(queries, topk=3)`, best of 5 passes; reference: `get_scores` alone, i.e. without even
picking its top 3, best of 2 passes),
how many queries get the identical top-3 (reference order: score descending, ties by corpus order)
and how many get bit-identical score vectors. Corpora: synthetic Zipf text at each --sizes, then the
demo world (`demo.make_world(seed=0).corpus`, its test questions as queries) if demo.py is there.
`--build-only N` instead measures building an index over N synthetic passages: time and memory.

    flock /tmp/dgpo-cpu.lock .venv/bin/python bench/bench_retriever.py
    flock /tmp/dgpo-cpu.lock .venv/bin/python bench/bench_retriever.py --build-only 1000000
"""
import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import demo  # noqa: E402
from retriever import BM25Retriever, tokenize  # noqa: E402


def zipf_corpus(n: int, seed: int, vocab: int = 50_000, exponent: float = 1.1) -> list[dict]:
    """n passages "title\\ntext": a 1-4 word title and 20-60 words of text, words drawn from a
    Zipf(exponent) distribution over `vocab` invented words (so a few words are in most passages)."""
    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "ra", "te", "su", "no", "vi", "de", "pa", "zo", "ge", "fu", "ri", "an", "el"]
    words = ["".join(syllables[(i >> s) % 16] for s in (0, 4, 8, 12)[: 2 + i % 3]) + str(i // 4096) for i in range(vocab)]
    p = 1.0 / np.arange(1, vocab + 1) ** exponent
    title_len, text_len = rng.integers(1, 5, n), rng.integers(20, 61, n)
    tokens = rng.choice(vocab, size=int(title_len.sum() + text_len.sum()), p=p / p.sum()).tolist()
    rows, at = [], 0
    for i in range(n):
        title = " ".join(words[t] for t in tokens[at: at + title_len[i]])
        at += title_len[i]
        text = " ".join(words[t] for t in tokens[at: at + text_len[i]])
        at += text_len[i]
        rows.append({"id": str(i), "contents": f"{title}\n{text}"})
    return rows


def queries_from_passages(rows: list[dict], n: int, seed: int) -> list[str]:
    """Queries an agent might write: 2-6 words taken from a random passage (so they share its
    common words too)."""
    rng = np.random.default_rng(seed)
    queries = []
    for _ in range(n):
        words = tokenize(rows[int(rng.integers(len(rows)))]["contents"])
        queries.append(" ".join(rng.choice(words, size=min(len(words), int(rng.integers(2, 7))), replace=False)))
    return queries


def best_time(run, repeats: int):
    """(result, fastest wall time of `repeats` runs): the least disturbed by other work on the machine."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - started)
    return result, best


def compare(name: str, rows: list[dict], queries: list[str]) -> dict:
    import rank_bm25

    started = time.perf_counter()
    ours = BM25Retriever(rows)
    build_ours = time.perf_counter() - started
    started = time.perf_counter()
    reference = rank_bm25.BM25Okapi([tokenize(r["contents"]) for r in rows])
    build_reference = time.perf_counter() - started

    hits, per_query_ours = best_time(lambda: ours.search(queries, topk=3), repeats=5)
    reference_scores, per_query_reference = best_time(
        lambda: [reference.get_scores(tokenize(q)) for q in queries], repeats=2)
    per_query_ours, per_query_reference = per_query_ours / len(queries), per_query_reference / len(queries)

    same_top3 = bit_identical = 0
    for query, our_hits, scores in zip(queries, hits, reference_scores):
        best = np.lexsort((np.arange(len(scores)), -scores))[:3]  # score descending, then corpus order
        same_top3 += [h["id"] for h in our_hits] == [rows[i]["id"] for i in best]
        bit_identical += np.array_equal(ours.scores(query), scores)
    return {"corpus": name, "passages": len(rows), "tokens": int(sum(reference.doc_len)),
            "build_ours": build_ours, "build_reference": build_reference,
            "ms_ours": 1e3 * per_query_ours, "ms_reference": 1e3 * per_query_reference,
            "queries": len(queries), "same_top3": same_top3, "bit_identical": bit_identical}


def print_table(results: list[dict]):
    print("| corpus | passages | tokens | build ours (s) | build rank_bm25 (s) | ours ms/query | "
          "rank_bm25 ms/query | speed-up | identical top-3 | bit-identical scores |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['corpus']} | {r['passages']:,} | {r['tokens']:,} | {r['build_ours']:.2f} | {r['build_reference']:.2f} | "
              f"{r['ms_ours']:.3f} | {r['ms_reference']:.1f} | {r['ms_reference'] / r['ms_ours']:.0f}x | "
              f"{r['same_top3']}/{r['queries']} | {r['bit_identical']}/{r['queries']} |")


def rss_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, from /proc (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def build_only(n: int, seed: int):
    rows = zipf_corpus(n, seed)
    before = rss_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM, so the peak below is the build's
        f.write("5")
    started = time.perf_counter()
    retriever = BM25Retriever(rows)
    seconds = time.perf_counter() - started
    peak, after = rss_mib("VmHWM"), rss_mib("VmRSS")
    n_tokens = int(retriever._tf.sum())                 # Σ over postings of the term counts
    arrays = sum(a.nbytes for a in (retriever._start, retriever._doc, retriever._tf, retriever._idf, retriever._norm)) / 2**20
    queries = queries_from_passages(rows, 100, seed + 1)
    ms = 1e3 * best_time(lambda: retriever.search(queries, topk=3), repeats=3)[1] / len(queries)
    print(f"| passages | tokens | vocabulary | postings | build (s) | RSS before (MiB) | peak during build (MiB) | "
          f"RSS after (MiB) | index arrays (MiB) | ms/query |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {n:,} | {n_tokens:,} | {len(retriever._vocab):,} | {len(retriever._doc):,} | {seconds:.1f} | {before:.0f} | "
          f"{peak:.0f} | {after:.0f} | {arrays:.0f} | {ms:.2f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--build-only", type=int, default=0, metavar="N", help="only build over N passages, report time and memory")
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"numpy {np.__version__}")
    if args.build_only:
        return build_only(args.build_only, args.seed)

    results = []
    for n in args.sizes:
        rows = zipf_corpus(n, args.seed)
        results.append(compare(f"Zipf synthetic", rows, queries_from_passages(rows, args.queries, args.seed + 1)))
    world = demo.make_world(seed=0)
    questions = [q["question"] for q in world.test[: args.queries]]
    results.append(compare("demo world (test questions)", world.corpus, questions))
    print_table(results)


if __name__ == "__main__":
    main()
