"""retriever.py: BM25 scores against rank_bm25 (the reference), ranking and ties, the observation
format, corpus loading errors, and the Search-R1 HTTP API on loopback."""
import gzip
import http.client
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import rank_bm25

import retriever as R
from retriever import BM25Retriever, HTTPRetriever, format_passages, load_corpus, make_server, tokenize

REPO = Path(__file__).resolve().parents[1]

# Six passages. "the" is in all of them and "city" in four (> N/2 = 3): both have a negative raw idf
# log(N - n + 0.5) - log(n + 0.5), so the reference replaces it with epsilon * mean idf.
SMALL = [
    {"id": "p0", "contents": "Paris\nParis is the capital city of France."},
    {"id": "p1", "contents": "Lima\nLima is the capital city of Peru, a city by the sea."},
    {"id": "p2", "contents": "Hamlet\nHamlet is a tragedy written by William Shakespeare."},
    {"id": "p3", "contents": "Kyoto\nKyoto is the old city of the emperors."},
    {"id": "p4", "contents": "The Tempest\nThe Tempest is the last play of Shakespeare."},
    {"id": "p5", "contents": "Oslo\nOslo is the capital city of Norway; the city is cold."},
]


def reference(passages, k1=1.5, b=0.75, epsilon=0.25):
    return rank_bm25.BM25Okapi([tokenize(p["contents"]) for p in passages], k1=k1, b=b, epsilon=epsilon)


def zipf_corpus(n, seed, vocab=400, exponent=1.1):
    """n passages "title\\ntext" of Zipf-distributed words w0 (most common) .. w{vocab-1}."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, vocab + 1) ** exponent
    rows = []
    for i in range(n):
        words = [f"w{t}" for t in rng.choice(vocab, size=int(rng.integers(1, 30)), p=p / p.sum())]
        rows.append({"id": f"d{i}", "contents": " ".join(words[:2]) + "\n" + " ".join(words[2:])})
    return rows


def zipf_queries(rows, n, seed):
    """Words drawn from passages (so they hit), with repeats, plus unknown words and an empty query."""
    rng = np.random.default_rng(seed)
    queries = []
    for _ in range(n):
        words = tokenize(rows[int(rng.integers(len(rows)))]["contents"])
        queries.append(" ".join(rng.choice(words, size=int(rng.integers(1, 7)))))
    return queries + ["w0 w0 w0 w1", "unknownword w3", "zzz qqq", ""]


def test_tokenize_lowercases_and_splits_on_non_word_characters():
    assert tokenize('Who wrote "Hamlet"? It\'s 1603_b, CAFÉ-au-lait!') == \
        ["who", "wrote", "hamlet", "it", "s", "1603_b", "café", "au", "lait"]
    assert tokenize("  \n\t ") == []


def test_small_corpus_has_terms_in_more_than_half_the_passages():
    # The precondition that makes the next test exercise the epsilon floor.
    df = {w: sum(w in tokenize(p["contents"]) for p in SMALL) for w in ("the", "city", "is")}
    assert df["the"] > len(SMALL) / 2 and df["city"] > len(SMALL) / 2 and df["is"] == len(SMALL)


@pytest.mark.parametrize("query", ["capital city", "the city the city", "Shakespeare tragedy",
                                   "the", "city of the sea", "unknownword", "Paris unknownword paris"])
def test_scores_equal_rank_bm25_with_epsilon_floor_and_repeated_words(query):
    ours = BM25Retriever(SMALL).scores(query)
    theirs = reference(SMALL).get_scores(tokenize(query))
    assert ours.shape == (len(SMALL),)
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=0)


def test_repeated_query_word_counts_once_per_occurrence():
    r = BM25Retriever(SMALL)
    np.testing.assert_allclose(r.scores("lima lima"), 2 * r.scores("lima"), rtol=1e-12)
    assert r.scores("lima")[1] > 0


def test_negative_mean_idf_gives_negative_floor_like_rank_bm25():
    # Most words are in every passage, so the mean idf (and with it the floor) is negative.
    rows = [{"id": str(i), "contents": f"a b c d\nfiller{i} a b"} for i in range(7)]
    ref = reference(rows)
    assert ref.average_idf < 0
    for query in ["a", "a filler3", "b c d filler0 filler0"]:
        np.testing.assert_allclose(BM25Retriever(rows).scores(query), ref.get_scores(tokenize(query)),
                                   rtol=1e-9, atol=0)


@pytest.mark.parametrize("k1,b,epsilon", [(1.5, 0.75, 0.25), (0.9, 0.4, 0.0), (2.0, 1.0, 0.5), (1.2, 0.0, 0.25)])
def test_scores_are_bit_identical_to_rank_bm25_on_zipf_corpus(k1, b, epsilon):
    rows = zipf_corpus(300, seed=1)
    ours, ref = BM25Retriever(rows, k1=k1, b=b, epsilon=epsilon), reference(rows, k1, b, epsilon)
    for query in zipf_queries(rows, 40, seed=2):
        # The reference's float operations in the reference's order: equal to the last bit
        # (the issue asks for 1e-9 relative; bit equality also keeps ties exactly where it has them).
        np.testing.assert_array_equal(ours.scores(query), ref.get_scores(tokenize(query)))


def test_word_repeated_hundreds_of_times_and_integer_parameters_score_like_rank_bm25():
    # tf = 300 does not fit the uint8 the index usually stores; with tf = 100 in uint8, an int k1 = 2
    # must not turn tf * (k1 + 1) = 300 into wrapped-around integer arithmetic.
    for repeats in (100, 300):
        rows = SMALL + [{"id": "long", "contents": "Echo\n" + "echo " * repeats + "city"}]
        for k1 in (1.5, 2):
            ref = reference(rows, k1=k1)
            for query in ["echo", "echo city", "city"]:
                np.testing.assert_array_equal(BM25Retriever(rows, k1=k1).scores(query), ref.get_scores(tokenize(query)))


def test_search_ranks_like_rank_bm25_scores_with_ties_in_corpus_order():
    rows = zipf_corpus(300, seed=3)
    ours, ref = BM25Retriever(rows), reference(rows)
    queries = [q for q in zipf_queries(rows, 40, seed=4) if q.strip()]
    for query, hits in zip(queries, ours.search(queries, topk=5)):
        s = ref.get_scores(tokenize(query))
        expected = sorted(range(len(rows)), key=lambda i: (-s[i], i))[:5]
        assert [h["id"] for h in hits] == [rows[i]["id"] for i in expected]
        assert [h["score"] for h in hits] == [s[i] for i in expected]
        assert [h["contents"] for h in hits] == [rows[i]["contents"] for i in expected]


@pytest.mark.parametrize("rows_per_block", [1, 3, 7, 1000])
def test_batched_search_is_bit_identical_to_rank_bm25_for_any_block_size(monkeypatch, rows_per_block):
    # search() scores rows_per_block queries together in one bincount; queries sharing words, blank
    # queries and unknown words must not leak into each other's rows, whatever the block boundaries.
    rows = zipf_corpus(300, seed=6)
    monkeypatch.setattr(R, "_BLOCK_BYTES", 8 * len(rows) * rows_per_block)
    ours, ref = BM25Retriever(rows), reference(rows)
    queries = zipf_queries(rows, 30, seed=7) + ["  ", "w1 w1", "w1"]
    batch = ours.search(queries, topk=4)
    for query, hits in zip(queries, batch):
        if not query.strip():
            assert hits == []
            continue
        s = ref.get_scores(tokenize(query))
        expected = sorted(range(len(rows)), key=lambda i: (-s[i], i))[:4]
        assert [(h["id"], h["score"]) for h in hits] == [(rows[i]["id"], s[i]) for i in expected]
    assert batch == [ours.search([q], topk=4)[0] for q in queries]


def test_dense_rows_are_exactly_the_epsilon_floor_words_and_each_is_the_references_term_vector():
    rows = zipf_corpus(300, seed=11)
    ours, ref = BM25Retriever(rows), reference(rows)
    word_of_id = {t: w for w, t in ours._vocab.items()}
    floor_words = sorted(w for w, idf in ref.idf.items() if idf == ref.average_idf * ref.epsilon)
    assert len(floor_words) >= 2 and sorted(word_of_id[t] for t in ours._dense_words.tolist()) == floor_words
    assert ours._dense.shape == (len(floor_words), len(rows))
    for t, row in zip(ours._dense_words.tolist(), ours._dense):
        np.testing.assert_array_equal(row, ref.get_scores([word_of_id[t]]))   # one word: its term vector


@pytest.mark.parametrize("rows_per_block", [1, 4, 1000])
def test_queries_mixing_dense_and_sparse_words_in_any_order_are_bit_identical(monkeypatch, rows_per_block):
    # A dense word's row is added in one pass, other words by postings; the words before the first
    # dense word of a query go through the block's bincount, the others one by one. Every order of
    # two floor words and two sparse words (one repeated) must still add in the reference's order.
    import itertools
    rows = zipf_corpus(300, seed=12)
    monkeypatch.setattr(R, "_BLOCK_BYTES", 8 * len(rows) * rows_per_block)
    ours, ref = BM25Retriever(rows), reference(rows)
    word_of_id = {t: w for w, t in ours._vocab.items()}
    dense = [word_of_id[t] for t in ours._dense_words.tolist()][:2]
    df = np.diff(ours._start)
    sparse = [word_of_id[t] for t in np.argsort(-df, kind="stable").tolist() if word_of_id[t] not in dense][:2]
    assert len(dense) == 2 and df[ours._vocab[sparse[1]]] * 2 < len(rows)
    queries = sorted({" ".join(p) for p in itertools.permutations(dense + sparse + [sparse[0]])}) + ["unknownword"]
    scores = [ref.get_scores(tokenize(q)) for q in queries]
    for query, expected in zip(queries, scores):
        np.testing.assert_array_equal(ours.scores(query), expected)
    # the order matters here: the same terms summed in another order differ in the last bit somewhere
    assert any(not np.array_equal(ref.get_scores(sorted(tokenize(q))), s) for q, s in zip(queries, scores))
    for query, hits, s in zip(queries, ours.search(queries, topk=5), scores):
        expected = sorted(range(len(rows)), key=lambda i: (-s[i], i))[:5]
        assert [(h["id"], h["score"]) for h in hits] == [(rows[i]["id"], s[i]) for i in expected]


def test_top_k_picks_each_rows_best_with_ties_in_column_order_for_small_and_large_k():
    scores = np.array([[1.0, 3.0, 3.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0], [-1.0, 2.0, -3.0, 2.0, 5.0]])
    for k, expected in [(3, [[1, 2, 4], [0, 1, 2], [4, 1, 3]]), (99, [[1, 2, 4, 0, 3], [0, 1, 2, 3, 4], [4, 1, 3, 0, 2]])]:
        best, values = R.top_k(scores.copy(), k)
        assert best.tolist() == expected
        assert values.tolist() == [[scores[r, c] for c in row] for r, row in enumerate(expected)]


def test_equal_scores_are_ordered_by_corpus_position_even_across_the_cut():
    # p1..p4 are identical, so they tie; "cat" ranks the tie below the unique best passage p5.
    rows = [{"id": "p0", "contents": "dog\nbarks"}] + \
           [{"id": f"p{i}", "contents": "cat\nmeows"} for i in range(1, 5)] + \
           [{"id": "p5", "contents": "cat\ncat cat"}]
    hits = BM25Retriever(rows).search(["cat"], topk=3)[0]
    assert [h["id"] for h in hits] == ["p5", "p1", "p2"]
    assert hits[1]["score"] == hits[2]["score"] > 0


def test_unknown_words_give_the_first_passages_with_zero_score():
    hits = BM25Retriever(SMALL).search(["xylophone zebra"], topk=3)[0]
    assert [(h["id"], h["score"]) for h in hits] == [("p0", 0.0), ("p1", 0.0), ("p2", 0.0)]


def test_empty_or_whitespace_query_gets_no_hits_in_a_batch():
    results = BM25Retriever(SMALL).search(["", "  \n ", "Lima"], topk=2)
    assert results[0] == [] and results[1] == []
    assert results[2][0]["id"] == "p1"


def test_topk_larger_than_corpus_returns_every_passage():
    assert len(BM25Retriever(SMALL).search(["city"], topk=50)[0]) == len(SMALL)


def test_large_topk_uses_the_same_order_as_small_topk():
    rows = zipf_corpus(300, seed=5)
    r = BM25Retriever(rows)
    assert r.search(["w0 w7"], topk=200)[0][:60] == r.search(["w0 w7"], topk=60)[0]


def test_search_rejects_a_bare_string_and_bad_topk():
    r = BM25Retriever(SMALL)
    with pytest.raises(TypeError, match="list of queries"):
        r.search("Lima")
    with pytest.raises(ValueError, match="topk"):
        r.search(["Lima"], topk=0)


def test_scores_do_not_change_the_index_and_search_leaves_scores_intact():
    r = BM25Retriever(SMALL)
    before = r.scores("capital city")
    r.search(["capital city"], topk=3)
    np.testing.assert_array_equal(r.scores("capital city"), before)


def test_get_returns_passage_by_id_and_names_a_missing_id():
    r = BM25Retriever(SMALL)
    assert r.get("p3") is SMALL[3] and r.passages[3] is SMALL[3]
    with pytest.raises(KeyError, match="nope"):
        r.get("nope")


@pytest.mark.parametrize("passages,message", [
    ([], "no passages"),
    ([{"id": "a", "contents": "x"}, {"id": "b"}], r'passages\[1\]: missing "contents"'),
    ([{"id": 7, "contents": "x"}], r'passages\[0\]: "id" must be a string'),
    ([{"id": "a", "contents": "x"}, {"id": "a", "contents": "y"}], r"passages\[1\]: duplicate id 'a'"),
    ([{"id": "a", "contents": "  ,;  "}], "no passage contains a word"),
])
def test_bad_passages_are_rejected_with_their_position(passages, message):
    with pytest.raises(ValueError, match=message):
        BM25Retriever(passages)


def test_format_passages_is_search_r1_text_byte_for_byte():
    hits = [{"id": "1", "contents": "Hamlet\nA tragedy by Shakespeare.", "score": 3.0},
            {"id": "2", "contents": "Lima\nCapital of Peru.\nOn the coast.", "score": 2.0},
            {"id": "3", "contents": "Title only", "score": 1.0}]
    assert format_passages(hits) == ("Doc 1(Title: Hamlet) A tragedy by Shakespeare.\n"
                                     "Doc 2(Title: Lima) Capital of Peru.\nOn the coast.\n"
                                     "Doc 3(Title: Title only) \n")
    assert format_passages([]) == ""


# ---------------------------------------------------------------------------------------------
# Corpus files


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return str(path)


def test_load_corpus_reads_rows_and_skips_blank_lines(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [json.dumps(r) for r in SMALL[:2]] + ["", json.dumps(SMALL[2])])
    assert load_corpus(path) == SMALL[:3]
    r = BM25Retriever.from_jsonl(path, k1=1.2)
    assert r.k1 == 1.2 and [p["id"] for p in r.passages] == ["p0", "p1", "p2"]


@pytest.mark.parametrize("bad_line,message", [
    ('{"id": "x", "contents": "T\\nbody"', "not valid JSON"),
    ('["x", "T\\nbody"]', "expected a JSON object"),
    ('{"id": "x"}', 'missing "contents"'),
    ('{"id": 3, "contents": "T\\nbody"}', '"id" must be a string'),
    ('{"id": "p0", "contents": "T\\nbody"}', "duplicate id 'p0' \\(first on line 1\\)"),
])
def test_malformed_corpus_line_fails_naming_file_and_line(tmp_path, bad_line, message):
    path = write_lines(tmp_path / "c.jsonl", [json.dumps(SMALL[0]), "", bad_line, json.dumps(SMALL[1])])
    with pytest.raises(ValueError, match=re.escape(path) + ":3: " + message):
        load_corpus(path)


def test_a_latin1_corpus_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(SMALL[0]).encode() + b"\n" + '{"id": "x", "contents": "Caf\xe9\\nbody"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=re.escape(str(path)) + r":2: not valid UTF-8 \(invalid continuation byte at byte 28\)"):
        load_corpus(str(path))


def test_a_gz_corpus_is_read_with_the_same_file_and_line_errors(tmp_path):
    lines = [json.dumps(r) for r in SMALL]
    good, bad = tmp_path / "c.jsonl.gz", tmp_path / "bad.jsonl.gz"
    good.write_bytes(gzip.compress("".join(line + "\n" for line in lines).encode()))
    assert load_corpus(str(good)) == SMALL
    bad.write_bytes(gzip.compress(("\n".join(lines[:2]) + '\n{"id": "p0", "contents": "x"}\n').encode()))
    with pytest.raises(ValueError, match=re.escape(str(bad)) + r":3: duplicate id 'p0' \(first on line 1\)"):
        load_corpus(str(bad))
    bad.write_bytes(gzip.compress(lines[0].encode() + b"\n\xff\n"))
    with pytest.raises(ValueError, match=re.escape(str(bad)) + ":2: not valid UTF-8"):
        load_corpus(str(bad))
    bad.write_bytes(good.read_bytes()[:-12])  # cut before the end-of-stream marker
    with pytest.raises(ValueError, match=re.escape(str(bad)) + r":\d+: not a readable gzip file"):
        load_corpus(str(bad))
    bad.write_bytes(b"".join(line.encode() + b"\n" for line in lines))  # plain text named .gz
    with pytest.raises(ValueError, match=re.escape(str(bad)) + ":1: not a readable gzip file"):
        load_corpus(str(bad))
    unnamed = tmp_path / "c.jsonl"  # gzip data without the .gz name
    unnamed.write_bytes(good.read_bytes())
    with pytest.raises(ValueError, match=re.escape(str(unnamed)) + ":1: not valid UTF-8.*name the file .gz"):
        load_corpus(str(unnamed))
    R.write_index(str(good), str(tmp_path / "index"))  # the index builder reads it the same way
    assert BM25Retriever.load(str(tmp_path / "index")).search(["Lima"]) == BM25Retriever(SMALL).search(["Lima"])


def test_empty_corpus_file_is_an_error_naming_the_file(tmp_path):
    path = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ValueError, match=re.escape(path) + ": the corpus holds no passages"):
        load_corpus(path)


# ---------------------------------------------------------------------------------------------
# HTTP API on loopback


@pytest.fixture
def server_url():
    """A BM25 server over SMALL on a free loopback port, in a thread of this process."""
    server = make_server(BM25Retriever(SMALL), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def free_port_with_nothing_listening():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post_raw(url, body: bytes):
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("suffix", ["", "/", "/retrieve", "/retrieve/"])
def test_http_client_and_server_round_trip_equals_local_search(server_url, suffix):
    queries = ["capital city", "", "Shakespeare", "xylophone"]
    remote = HTTPRetriever(server_url + suffix, topk=2).search(queries)
    assert remote == BM25Retriever(SMALL).search(queries, topk=2)
    assert remote[1] == [] and remote[0][0]["id"] in {"p1", "p5"}
    assert [len(h) for h in HTTPRetriever(server_url).search(queries, topk=4)] == [4, 0, 4, 4]


def test_server_reply_has_search_r1_shape(server_url):
    status, reply = post_raw(server_url + "/retrieve",
                             json.dumps({"queries": ["Lima"], "topk": 1, "return_scores": True}).encode())
    assert status == 200
    assert reply == {"result": [[{"document": {"id": "p1", "contents": SMALL[1]["contents"]},
                                  "score": BM25Retriever(SMALL).scores("Lima")[1]}]]}
    status, reply = post_raw(server_url + "/retrieve", json.dumps({"queries": ["Lima"], "topk": 1}).encode())
    assert reply == {"result": [[{"id": "p1", "contents": SMALL[1]["contents"]}]]}  # return_scores off


@pytest.mark.parametrize("body,status,message", [
    (b"{not json", 400, "must be JSON"),
    (b'{"queries": "Lima"}', 400, '"queries" must be a list of strings'),
    (b'{"queries": ["a", 3]}', 400, '"queries" must be a list of strings'),
    (b'{"queries": ["a"], "topk": -2}', 400, '"topk" must be a non-negative integer'),
    (b"[1, 2]", 400, "must be a JSON object"),
])
def test_server_answers_bad_requests_with_400_and_a_reason(server_url, body, status, message):
    got_status, reply = post_raw(server_url + "/retrieve", body)
    assert got_status == status and message in reply["error"]


def test_server_answers_unknown_path_with_404(server_url):
    status, reply = post_raw(server_url + "/search", b'{"queries": ["a"]}')
    assert status == 404 and "/retrieve" in reply["error"]


def test_server_handles_concurrent_requests(server_url):
    expected = BM25Retriever(SMALL).search(["capital city", "Shakespeare"], topk=3)
    outcomes = []

    def client():
        outcomes.extend(HTTPRetriever(server_url).search(["capital city", "Shakespeare"]) == expected
                        for _ in range(5))

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes == [True] * 30


def plain_post(port, body: bytes, headers=None):
    """(status, decoded JSON reply) of one POST /retrieve with http.client: no retries, no pooling."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", "/retrieve", body, {"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_two_hundred_simultaneous_plain_http_clients_all_get_correct_answers(server_url):
    # With the standard library's listen backlog of 5, most of these connections were reset.
    port = int(server_url.rsplit(":", 1)[1])
    expected = {"result": [[{"document": {"id": h["id"], "contents": h["contents"]}, "score": h["score"]} for h in hits]
                           for hits in BM25Retriever(SMALL).search(["capital city", "Shakespeare"], topk=3)]}
    body = json.dumps({"queries": ["capital city", "Shakespeare"], "topk": 3, "return_scores": True}).encode()
    start, replies = threading.Barrier(200), [None] * 200

    def client(i):
        start.wait()
        try:
            replies[i] = plain_post(port, body)
        except Exception as e:  # recorded, so the assertion shows what went wrong
            replies[i] = repr(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert replies == [(200, expected)] * 200


def test_a_content_length_of_1e11_gets_413_and_the_server_keeps_answering(server_url):
    port = int(server_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100000000000\r\n\r\n")
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].split()[1] == b"413"
    assert "100000000000 bytes is over this server's limit of 16777216" in json.loads(body)["error"]
    assert plain_post(port, b'{"queries": ["Lima"], "topk": 1}')[0] == 200


def test_request_size_limit_is_configurable_and_a_bad_length_is_400():
    server = make_server(BM25Retriever(SMALL), "127.0.0.1", 0, max_request_bytes=100)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    port = server.server_address[1]
    try:
        under = json.dumps({"queries": ["Lima"], "topk": 1}).encode()
        assert len(under) <= 100 and plain_post(port, under)[0] == 200
        status, reply = plain_post(port, json.dumps({"queries": ["Lima " * 30]}).encode())
        assert status == 413 and "over this server's limit of 100" in reply["error"]
        status, reply = plain_post(port, under, {"Content-Length": "-5"})
        assert status == 400 and "Content-Length" in reply["error"]
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(ValueError, match="max_request_bytes must be a positive integer"):
        make_server(BM25Retriever(SMALL), "127.0.0.1", 0, max_request_bytes=0)


def count_attempts(client):
    """Wraps the client's opener so each HTTP attempt is recorded; returns the record."""
    attempts, real_open = [], client._opener.open
    client._opener.open = lambda *args, **kwargs: attempts.append(1) or real_open(*args, **kwargs)
    return attempts


def test_client_rejected_request_fails_at_once_with_server_reason(server_url):
    client = HTTPRetriever(server_url, retries=3, backoff=0.001)
    attempts = count_attempts(client)
    # search() refuses this topk itself (next test), so the bad request is posted directly
    with pytest.raises(RuntimeError, match=re.escape(server_url + "/retrieve") + ".*HTTP 400.*topk"):
        client._post({"queries": ["Lima"], "topk": -1, "return_scores": True})
    assert len(attempts) == 1  # a request the server rejects is not worth repeating


@pytest.mark.parametrize("topk", [0, -1, 2.0, True])
def test_client_checks_topk_and_queries_like_the_local_retriever(server_url, topk):
    """A topk of 0 would reach the server as Search-R1's "use the default" and quietly give 3 hits."""
    client = HTTPRetriever(server_url, retries=0)
    attempts = count_attempts(client)
    with pytest.raises(ValueError, match="topk must be a positive integer"):
        client.search(["Lima"], topk=topk)
    with pytest.raises(ValueError, match="topk must be a positive integer"):
        HTTPRetriever(server_url, topk=topk).search(["Lima"])
    with pytest.raises(TypeError, match="each query must be a string, got int"):
        client.search(["Lima", 7])
    assert attempts == []                                  # refused before asking the server


def test_retries_if_given_caps_the_attempts_within_the_budget():
    url = f"http://127.0.0.1:{free_port_with_nothing_listening()}"
    client = HTTPRetriever(url, retries=2, backoff=0.001, timeout=2.0)
    attempts = count_attempts(client)
    with pytest.raises(RuntimeError, match=re.escape(url + "/retrieve") + ": no answer after 3 attempts.*retries=2"):
        client.search(["Lima"])
    assert len(attempts) == 3


def test_server_error_is_retried_then_succeeds():
    class FlakyRetriever:  # fails its first search, like a server mid-restart
        def __init__(self):
            self.calls, self.inner = 0, BM25Retriever(SMALL)

        def search(self, queries, topk=3):
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("index not ready")
            return self.inner.search(queries, topk)

    flaky = FlakyRetriever()
    server = make_server(flaky, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        hits = HTTPRetriever(f"http://127.0.0.1:{server.server_address[1]}", retries=1, backoff=0.001).search(["Lima"])
    finally:
        server.shutdown()
        server.server_close()
    assert flaky.calls == 2 and hits[0][0]["id"] == "p1"


def test_client_reads_search_r1_replies_without_ids_or_scores():
    client = HTTPRetriever("http://127.0.0.1:1")
    assert client._hit({"document": {"contents": "T\nx", "title": "T"}, "score": 0.5}) == \
        {"id": None, "contents": "T\nx", "score": 0.5}
    assert client._hit({"id": "9", "contents": "T\nx"}) == {"id": "9", "contents": "T\nx", "score": None}
    with pytest.raises(RuntimeError, match="127.0.0.1:1/retrieve.*contents"):
        client._hit({"document": {"text": "x"}})


def serve_in_thread(server):
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    return thread


def test_client_rides_out_a_server_that_comes_up_after_a_second_with_a_line_per_retry(capsys):
    port = free_port_with_nothing_listening()
    url = f"http://127.0.0.1:{port}/retrieve"
    started = []

    def start_late():  # a server restart: nothing listens for 1.2 s, then the server is back
        time.sleep(1.2)
        server = make_server(BM25Retriever(SMALL), "127.0.0.1", port)
        started.append(server)
        serve_in_thread(server)

    threading.Thread(target=start_late, daemon=True).start()
    client = HTTPRetriever(url, retry_seconds=20, backoff=0.05, max_backoff=0.2)
    attempts = count_attempts(client)
    try:
        assert client.search(["Lima"]) == BM25Retriever(SMALL).search(["Lima"])
    finally:
        for server in started:
            server.shutdown()
            server.server_close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == len(attempts) - 1 >= 5          # one line per retry: 0.05 + 0.1 + 0.2 + ... < 1.2 s
    for line in lines:
        assert line.startswith(f"retriever: {url}: ConnectionRefusedError") and "retrying in" in line
        assert re.search(r"\(\d+ s of the 20 s retry budget left\)$", line), line


def test_client_gives_up_when_the_retry_budget_runs_out_naming_the_url_and_budget(capsys):
    url = f"http://127.0.0.1:{free_port_with_nothing_listening()}/retrieve"
    client = HTTPRetriever(url, retry_seconds=0.6, backoff=0.05, max_backoff=0.1)
    attempts = count_attempts(client)
    began = time.monotonic()
    with pytest.raises(RuntimeError, match=re.escape(url) + r": no answer after \d+ attempts in [\d.]+ s "
                       r"\(retry budget: retry_seconds=0\.6\); last error: ConnectionRefusedError"):
        client.search(["Lima"])
    assert 0.6 <= time.monotonic() - began < 3
    assert len(attempts) >= 6                              # bounded by time, not by a count of 3
    assert len(capsys.readouterr().err.splitlines()) == len(attempts) - 1


class SlowRetriever:
    """A server's retriever that takes `delay` seconds a search and counts the searches running at
    once. With `fail_on_overlap`, a search that starts while another runs raises, so the server answers
    500, as a FAISS index searched from two threads at once may fail."""

    def __init__(self, delay: float, fail_on_overlap: bool = False):
        self.delay, self.fail_on_overlap = delay, fail_on_overlap
        self.inner, self.lock = BM25Retriever(SMALL), threading.Lock()
        self.running = self.most = self.calls = 0

    def search(self, queries, topk=3):
        with self.lock:
            self.running += 1
            self.calls += 1
            self.most = max(self.most, self.running)
            overlap = self.running > 1
        try:
            if overlap and self.fail_on_overlap:
                raise RuntimeError("two searches at once")
            time.sleep(self.delay)
            return self.inner.search(queries, topk)
        finally:
            with self.lock:
                self.running -= 1


def slow_server(retriever):
    server = make_server(retriever, "127.0.0.1", 0)
    serve_in_thread(server)
    return server, f"http://127.0.0.1:{server.server_address[1]}/retrieve"


def stop(server):
    server.shutdown()
    server.server_close()                                  # waits for handlers still sleeping: bounded by the delay


def test_a_timed_out_request_fails_naming_server_and_batch_and_is_never_sent_again(capsys):
    """The fault of the issue: re-sending a timed-out request while the server still works on the first
    put two searches on the server at once. Now one attempt, one clear error, one search running."""
    slow = SlowRetriever(delay=1.0)
    server, url = slow_server(slow)
    client = HTTPRetriever(url, timeout=0.2, retry_seconds=30, backoff=0.01)
    attempts = count_attempts(client)
    try:
        with pytest.raises(TimeoutError, match=re.escape(url) + r": no reply to a batch of 2 queries within the "
                           r"timeout of 0\.2 s .*not sent again.*--retriever-timeout"):
            client.search(["Lima", "Quito"])
        time.sleep(1.2)                                    # past the server's delay: any re-send would show now
    finally:
        stop(server)
    assert len(attempts) == 1 and slow.calls == 1 and slow.most == 1
    assert "retrying" not in capsys.readouterr().err       # (the server logs the client that went away)


def test_a_hung_server_with_a_timeout_fails_at_once_not_after_the_retry_budget():
    with socket.socket() as hung:                          # accepts connections (the backlog), never answers
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)
        url = f"http://127.0.0.1:{hung.getsockname()[1]}/retrieve"
        client = HTTPRetriever(url, timeout=0.2, retry_seconds=60)
        attempts = count_attempts(client)
        began = time.monotonic()
        with pytest.raises(TimeoutError, match=re.escape(url) + ".*batch of 1 query within.*TimeoutError"):
            client.search(["Lima"])
    assert len(attempts) == 1 and time.monotonic() - began < 10


def run_then_stop(threads, server) -> None:
    """Starts the threads, waits for each (20 s at most), then stops the loopback server whatever happened."""
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=20)
    finally:
        stop(server)


def test_without_a_timeout_a_slow_server_is_waited_for_with_one_request_in_flight():
    """The default, as Search-R1: no timeout. Three threads share one client (as nothing in the project
    does, but nothing stops a user): the client's lock still lets one request run at a time."""
    slow = SlowRetriever(delay=0.3, fail_on_overlap=True)
    server, url = slow_server(slow)
    client = HTTPRetriever(url, retry_seconds=0)           # an overlap's 500 would fail the search, not be retried
    assert client.timeout is None
    results, errors = [], []

    def call(query):
        try:
            results.append(client.search([query]))
        except Exception as e:                             # noqa: BLE001 - reported by the assert below
            errors.append(e)

    threads = [threading.Thread(target=call, args=(q,)) for q in ("Lima", "Quito", "Peru")]
    run_then_stop(threads, server)
    assert errors == [] and len(results) == 3
    assert slow.calls == 3 and slow.most == 1


def test_the_overlap_detector_itself_fails_on_two_requests_at_once():
    """The check above would pass vacuously if the slow server could not see an overlap: two clients
    (two callers) at once do overlap, and the second search fails."""
    slow = SlowRetriever(delay=0.5, fail_on_overlap=True)
    server, url = slow_server(slow)
    errors = []

    def call():
        try:
            HTTPRetriever(url, retry_seconds=0).search(["Lima"])
        except RuntimeError as e:
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(2)]
    run_then_stop(threads, server)
    assert slow.most == 2 and len(errors) == 1 and "HTTP 500" in str(errors[0])


def test_a_retry_budget_of_zero_makes_one_attempt():
    client = HTTPRetriever(f"http://127.0.0.1:{free_port_with_nothing_listening()}", retry_seconds=0)
    attempts = count_attempts(client)
    with pytest.raises(RuntimeError, match="no answer after 1 attempt in"):
        client.search(["Lima"])
    assert len(attempts) == 1


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "localhost:8000/retrieve", "ftp://127.0.0.1:8000", "http://",
                                 "http:///retrieve", "http://127.0.0.1:99999"])
def test_a_url_without_http_scheme_or_host_is_refused_at_construction(url):
    with pytest.raises(ValueError, match=re.escape(repr(url))):
        HTTPRetriever(url)


@pytest.mark.parametrize("keyword,value", [("retry_seconds", -1), ("retry_seconds", float("inf")),
                                           ("retry_seconds", float("nan")), ("timeout", 0),
                                           ("timeout", float("inf")), ("backoff", -0.5),
                                           ("max_backoff", 0), ("retries", -1), ("retries", 1.5)])
def test_client_refuses_bad_retry_settings_naming_them(keyword, value):
    with pytest.raises(ValueError, match=f"HTTPRetriever: {keyword} must be"):
        HTTPRetriever("http://127.0.0.1:8000", **{keyword: value})


def scripted_server(reply):
    """A loopback server that answers every POST with reply(request body) -> (status, body)."""
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            status, body = reply(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    serve_in_thread(server)
    return server


def fixed_reply_server(body: bytes, status: int = 200):
    """A loopback server that answers every POST with `body`: a server of some other kind."""
    return scripted_server(lambda request: (status, body))


def test_client_sends_blank_queries_as_search_r1_does_and_keeps_their_hits():
    """Search-R1 posts every `<search>`'s text, blank included, and an e5 server answers "" with
    passages: the client sends the queries as given, in order, and returns each one's hits."""
    payloads = []

    def reply(request: bytes):
        payload = json.loads(request)
        payloads.append(payload)
        result = [[{"document": {"id": f"d{i}", "contents": f"T\n{q!r}"}, "score": 1.0}]
                  for i, q in enumerate(payload["queries"])]
        return 200, json.dumps({"result": result}).encode()

    server = scripted_server(reply)
    try:
        client = HTTPRetriever(f"http://127.0.0.1:{server.server_address[1]}")
        hits = client.search(["Lima", "", "  ", "Paris"], topk=1)
        assert payloads == [{"queries": ["Lima", "", "  ", "Paris"], "topk": 1, "return_scores": True}]
        assert [h[0]["contents"] for h in hits] == ["T\n'Lima'", "T\n''", "T\n'  '", "T\n'Paris'"]
        assert client.search([]) == [] and len(payloads) == 1         # nothing to ask: no request
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("body,message", [
    (b'{"result": [null]}', r'"result"\[0\] must be a list of hits, got None'),
    (b'{"result": [7]}', r'"result"\[0\] must be a list of hits, got 7'),
    (b'{"result": 3}', r'expected \{"result": \[...\]\} with 1 hit lists, got'),
    (b'{"result": [[null]]}', r'a hit has no "contents" string: None'),
    (b'{"result": [[{"document": {"contents": "T\\nx"}, "score": "high"}]]}', r'"score" is not a number'),
    (b"\xff\xfe not utf-8", r"replied with invalid JSON"),
    (b"<html>Welcome to nginx</html>", r"replied with invalid JSON: b'<html>"),
])
def test_a_malformed_reply_is_an_error_naming_the_url_and_what_is_wrong(body, message):
    server = fixed_reply_server(body)
    url = f"http://127.0.0.1:{server.server_address[1]}/retrieve"
    try:
        client = HTTPRetriever(url, retry_seconds=5)
        attempts = count_attempts(client)
        with pytest.raises(RuntimeError, match=re.escape(url) + ".*" + message):
            client.search(["Lima"])
        assert len(attempts) == 1                          # a server of another kind: not worth repeating
    finally:
        server.shutdown()
        server.server_close()


def test_server_refuses_a_topk_over_its_limit_with_400_and_answers_up_to_it(server_url):
    port = int(server_url.rsplit(":", 1)[1])
    status, reply = plain_post(port, json.dumps({"queries": ["Lima"] * 200, "topk": 10**9}).encode())
    assert status == 400 and reply == {"error": "\"topk\" 1000000000 is over this server's limit of 100 "
                                                "passages per query (serve --max-topk)"}
    status, reply = plain_post(port, json.dumps({"queries": ["Lima"], "topk": R.MAX_TOPK}).encode())
    assert status == 200 and len(reply["result"][0]) == len(SMALL)   # the whole (small) corpus: allowed


def test_max_topk_is_configurable_and_the_client_fails_at_once_with_the_reason():
    server = make_server(BM25Retriever(SMALL), "127.0.0.1", 0, max_topk=2)
    serve_in_thread(server)
    port = server.server_address[1]
    try:
        assert plain_post(port, b'{"queries": ["Lima"], "topk": 2}')[0] == 200
        assert plain_post(port, b'{"queries": ["Lima"], "topk": 3}')[0] == 400
        status, reply = plain_post(port, b'{"queries": ["Lima"]}')       # the default 3 shrinks to the limit
        assert status == 200 and len(reply["result"][0]) == 2
        client = HTTPRetriever(f"http://127.0.0.1:{port}", retry_seconds=5)
        attempts = count_attempts(client)
        with pytest.raises(RuntimeError, match=r"rejected the request: HTTP 400: .*limit of 2 passages per query"):
            client.search(["Lima"], topk=3)
        assert len(attempts) == 1
    finally:
        server.shutdown()
        server.server_close()
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="max_topk must be a positive integer"):
            make_server(BM25Retriever(SMALL), "127.0.0.1", 0, max_topk=bad)


def test_a_client_that_hangs_up_before_its_reply_costs_one_line_on_the_server_not_a_traceback(capfd):
    class GatedRetriever:  # holds the request until the client is gone
        def __init__(self):
            self.entered, self.go = threading.Event(), threading.Event()

        def search(self, queries, topk=3):
            self.entered.set()
            self.go.wait(10)
            return BM25Retriever(SMALL).search(queries, topk)

    gated = GatedRetriever()
    server = make_server(gated, "127.0.0.1", 0)
    serve_in_thread(server)
    port = server.server_address[1]
    try:
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        client.sendall(b'POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: 32\r\n\r\n{"queries": ["Lima"], "topk": 1}')
        assert gated.entered.wait(10)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()                                     # a reset: the reply has nowhere to go
        gated.go.set()
        deadline, err = time.monotonic() + 10, ""
        while "went away" not in err and time.monotonic() < deadline:
            time.sleep(0.05)
            err += capfd.readouterr().err
        time.sleep(0.2)
        err += capfd.readouterr().err
        assert re.fullmatch(r"retriever: client 127\.0\.0\.1:\d+ went away mid-request "
                            r"\((BrokenPipeError|ConnectionResetError)\)\n", err), err
        assert plain_post(port, b'{"queries": ["Lima"], "topk": 1}')[0] == 200   # and it keeps serving
    finally:
        server.shutdown()
        server.server_close()


def run_cli(*args, timeout=60):
    return subprocess.run([sys.executable, str(REPO / "retriever.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("port,message", [
    (70000, r"error: argument --port: 70000 is not in \[0, 65535\] \(see retriever\.py serve --help\)"),
    (-1, r"error: argument --port: -1 is not in \[0, 65535\] \(see retriever\.py serve --help\)"),
    ("http", r"error: argument --port: expected an integer, got 'http' \(see retriever\.py serve --help\)"),
    ("BUSY", r"error: cannot listen on 127\.0\.0\.1:\d+: Address already in use \(another server\? "
             r"--port 0 picks a free port\)"),
])
def test_serve_on_a_bad_or_busy_port_is_one_line_and_exit_2(tmp_path, port, message):
    corpus = write_lines(tmp_path / "c.jsonl", [json.dumps(r) for r in SMALL])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        done = run_cli("serve", "--corpus", corpus, "--port", busy.getsockname()[1] if port == "BUSY" else port)
    assert done.returncode == 2 and done.stdout == ""
    assert re.fullmatch(message + r"\n", done.stderr), done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("args,message", [
    (["serve", "--corpus", "C", "--max-topk", "0"], r"error: argument --max-topk: 0 is not in \[1, inf\] \(see .*"),
    (["serve", "--corpus", "C", "--max-request-bytes", "0"], r"error: argument --max-request-bytes: 0 is not in \[1, inf\] \(see .*"),
    (["serve"], r"error: one of the arguments --corpus --index is required \(see .*"),
    (["index", "--corpus", "MISSING", "--out", "OUT"], r"error: \[Errno 2\] No such file or directory: 'MISSING'"),
    (["index", "--corpus", "BAD", "--out", "OUT"], r'error: BAD:2: missing "contents"'),
    (["serve", "--corpus", "BAD", "--port", "0"], r'error: BAD:2: missing "contents"'),
    (["serve", "--index", "MISSING"], r"error: MISSING: no such index directory .*"),
    (["serve", "--corpus", "C", "--no-verify"], r"error: --no-verify: only an --index is verified .*"),
])
def test_command_line_user_errors_are_one_line_and_exit_2(tmp_path, args, message):
    paths = {"C": write_corpus(tmp_path / "c.jsonl", SMALL), "MISSING": str(tmp_path / "missing"),
             "BAD": write_lines(tmp_path / "bad.jsonl", [json.dumps(SMALL[0]), '{"id": "x"}']),
             "OUT": str(tmp_path / "out")}
    done = run_cli(*[paths.get(a, a) for a in args])
    expected = message
    for name, path in paths.items():
        expected = expected.replace(name, re.escape(path))
    assert done.returncode == 2 and re.fullmatch(expected + r"\n", done.stderr), done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_serve_command_line_serves_a_jsonl_corpus(tmp_path):
    corpus = write_lines(tmp_path / "c.jsonl", [json.dumps(r) for r in SMALL])
    process = subprocess.Popen([sys.executable, str(REPO / "retriever.py"), "serve", "--corpus", corpus, "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()  # "retriever: serving at http://127.0.0.1:PORT/retrieve"
        match = re.search(r"http://127\.0\.0\.1:\d+/retrieve", line)
        assert match, (line, process.stderr.read() if process.poll() is not None else "")
        assert HTTPRetriever(match.group(0)).search(["Shakespeare"]) == BM25Retriever(SMALL).search(["Shakespeare"])
    finally:
        process.terminate()
        process.wait(timeout=10)
        process.stdout.close()
        process.stderr.close()


# ---------------------------------------------------------------------------------------------
# The index on disk: `python retriever.py index`, BM25Retriever.load


def write_corpus(path, rows):
    return write_lines(path, [json.dumps(r) for r in rows])


@pytest.fixture
def small_chunks(monkeypatch):
    """Builds in chunks of ~50 tokens, so a 300-passage corpus has dozens of chunks to merge."""
    monkeypatch.setattr(R, "_CHUNK_TOKENS", 50)


@pytest.mark.parametrize("k1,b,epsilon", [(1.5, 0.75, 0.25), (0.9, 0.4, 0.0)])
def test_index_round_trip_scores_are_bit_identical_to_building_from_the_corpus(tmp_path, small_chunks, k1, b, epsilon):
    rows = zipf_corpus(300, seed=8) + [{"id": "empty", "contents": " ,. "}, {"id": "é\u00e8\ud800", "contents": "Café\nnaïve w1"}]
    corpus = write_corpus(tmp_path / "c.jsonl", rows)
    meta = R.write_index(corpus, str(tmp_path / "index"), k1=k1, b=b, epsilon=epsilon)
    loaded, built, ref = BM25Retriever.load(str(tmp_path / "index")), BM25Retriever(rows, k1, b, epsilon), reference(rows, k1, b, epsilon)
    assert (loaded.k1, loaded.b, loaded.epsilon) == (k1, b, epsilon) and meta["passages"] == len(loaded) == len(rows)
    queries = zipf_queries(rows, 30, seed=9) + ["café naïve"]
    for query in queries:
        np.testing.assert_array_equal(loaded.scores(query), ref.get_scores(tokenize(query)))
        np.testing.assert_array_equal(loaded.scores(query), built.scores(query))
    assert loaded.search(queries, topk=5) == built.search(queries, topk=5)
    assert [loaded.get(r["id"]) for r in rows] == [{"id": r["id"], "contents": r["contents"]} for r in rows]
    assert loaded.passages[-1] == {"id": "é\u00e8\ud800", "contents": "Café\nnaïve w1"}
    with pytest.raises(KeyError, match="nope"):
        loaded.get("nope")
    assert all(isinstance(getattr(loaded, name), np.memmap) for name in ("_doc", "_tf", "_dense"))  # mapped, not read
    np.testing.assert_array_equal(loaded._dense, built._dense)
    assert loaded._dense_words.tolist() == built._dense_words.tolist() and len(built._dense_words) >= 1
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == sorted(  # the spilled chunks are gone
        ["meta.json", "vocab.txt", "ids.bin", "contents.bin"] + [f"{name}.npy" for name in
                                                                 ("start", "doc", "tf", "idf", "norm", "dense_words", "dense", "id_offsets", "contents_offsets", "id_order")])


def test_chunked_build_equals_a_single_chunk_build(monkeypatch):
    rows = zipf_corpus(300, seed=10)
    whole = BM25Retriever(rows)
    monkeypatch.setattr(R, "_CHUNK_TOKENS", 7)  # chunks end mid-corpus every passage or two
    chunked = BM25Retriever(rows)
    for name in ("_start", "_doc", "_tf", "_idf", "_norm", "_dense_words", "_dense"):
        np.testing.assert_array_equal(getattr(chunked, name), getattr(whole, name))
    assert list(chunked._vocab.items()) == list(whole._vocab.items())


def test_index_refuses_an_existing_out_and_a_bad_corpus_leaves_nothing(tmp_path):
    corpus = write_lines(tmp_path / "c.jsonl", [json.dumps(SMALL[0]), '{"id": "x"}'])
    out = tmp_path / "index"
    with pytest.raises(ValueError, match=re.escape(corpus) + ':2: missing "contents"'):
        R.write_index(corpus, str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]  # no index, no temporary directory
    out.mkdir()
    with pytest.raises(FileExistsError, match=re.escape(str(out)) + ": already exists"):
        R.write_index(corpus, str(out))


@pytest.mark.slow
def test_a_build_killed_before_it_finishes_leaves_no_index_and_an_unloadable_temp_dir(tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", SMALL)
    # SIGKILL the build while it writes meta.json: everything else is on disk by then
    script = ("import json, os, signal, sys; sys.path.insert(0, sys.argv[1]); import retriever; "
              "json.dump = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL); "
              "retriever.write_index(sys.argv[2], sys.argv[3])")
    done = subprocess.run([sys.executable, "-c", script, str(REPO), corpus, str(tmp_path / "index")])
    assert done.returncode == -9
    leftovers = [p for p in tmp_path.iterdir() if p.name != "c.jsonl"]
    assert not (tmp_path / "index").exists() and [p.name.startswith("index.tmp-") for p in leftovers] == [True]
    with pytest.raises(ValueError, match=re.escape(str(leftovers[0])) + ": not a BM25 index: no meta.json"):
        BM25Retriever.load(str(leftovers[0]))


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("index")
    R.write_index(write_corpus(root / "c.jsonl", SMALL), str(root / "index"))
    return root / "index"


def damaged_copy(index_dir, tmp_path, damage):
    import shutil
    copy = tmp_path / "damaged"
    shutil.copytree(index_dir, copy)
    damage(copy)
    return str(copy)


def edit_meta(**changes):
    def damage(d):
        meta = json.loads((d / "meta.json").read_text())
        meta.update(changes)
        for key in [k for k, v in changes.items() if v is None]:
            del meta[key]
        (d / "meta.json").write_text(json.dumps(meta))
    return damage


def without_checksums(damage):
    """The damage, done to an index as an older retriever.py wrote it (no file sizes or CRCs in
    meta.json): the structural checks must catch it on their own."""
    def apply(d):
        edit_meta(files=None)(d)
        damage(d)
    return apply


def flip_bytes(name, count=64):
    """Bit rot: `count` bytes from the middle of the file on are changed, its size is not."""
    def damage(d):
        data = bytearray((d / name).read_bytes())
        for i in range(len(data) // 2, min(len(data), len(data) // 2 + count)):
            data[i] ^= 0x5A
        (d / name).write_bytes(bytes(data))
    return damage


def truncate_tf(d):
    (d / "tf.npy").write_bytes((d / "tf.npy").read_bytes()[:-5])


def shrink_norm(d):
    np.save(d / "norm.npy", np.zeros(3))


def reshape_dense(d):
    np.save(d / "dense.npy", np.zeros((1, 3)))


def shift_start(d):
    np.save(d / "start.npy", np.load(d / "start.npy") + 1)


def short_vocab(d):
    (d / "vocab.txt").write_text("a\nb")


SIZE = r"\d+ bytes, expected \d+ \(meta\.json\): truncated or replaced"


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "meta.json").unlink(), r"DIR: not a BM25 index: no meta\.json"),
    (lambda d: (d / "meta.json").write_text("{trunc"), r"DIR/meta\.json: unreadable"),
    (edit_meta(format="bm25s"), r"DIR: not a BM25 index written by retriever\.py"),
    (edit_meta(version=2), r"DIR: index version 2, this retriever\.py reads version 1"),
    (edit_meta(k1=None), r"DIR/meta\.json: lacks k1"),
    (edit_meta(files=[1]), r'DIR/meta\.json: "files" is not'),
    (lambda d: (d / "doc.npy").unlink(), r"DIR/doc\.npy: missing, expected \d+ \(meta\.json\)"),
    (truncate_tf, r"DIR/tf\.npy: " + SIZE),
    (shrink_norm, r"DIR/norm\.npy: " + SIZE),
    (shift_start, r"DIR/start\.npy: damaged: its CRC-32 is [0-9a-f]{8}, meta\.json records [0-9a-f]{8}"),
    (lambda d: (d / "contents.bin").write_bytes(b"short"), r"DIR/contents\.bin: 5 bytes, expected \d+"),
    (lambda d: (d / "ids.bin").unlink(), r"DIR/ids\.bin: missing, expected"),
    (short_vocab, r"DIR/vocab\.txt: " + SIZE),
    # an index without recorded sizes and checksums: the array and blob checks still hold
    (without_checksums(lambda d: (d / "doc.npy").unlink()), r"DIR/doc\.npy: missing or unreadable"),
    (without_checksums(truncate_tf), r"DIR/tf\.npy: missing or unreadable"),
    (without_checksums(shrink_norm), r"DIR/norm\.npy: float64 \(3,\), expected float64 \(6,\)"),
    (without_checksums(reshape_dense), r"DIR/dense\.npy: float64 \(1, 3\), expected float64 \(\d+, 6\)"),
    (without_checksums(shift_start), r"DIR/start\.npy: does not span"),
    (without_checksums(lambda d: (d / "contents.bin").write_bytes(b"short")), r"DIR/contents\.bin: 5 bytes, expected \d+"),
    (without_checksums(lambda d: (d / "ids.bin").unlink()), r"DIR/ids\.bin: missing, expected"),
    (without_checksums(short_vocab), r"DIR/vocab\.txt: 2 words, expected"),
])
def test_a_damaged_or_foreign_index_is_refused_naming_the_file(index_dir, tmp_path, damage, message):
    path = damaged_copy(index_dir, tmp_path, damage)
    with pytest.raises(ValueError, match=message.replace("DIR", re.escape(path))):
        BM25Retriever.load(path)


@pytest.mark.parametrize("name", ["doc.npy", "tf.npy", "idf.npy", "norm.npy", "start.npy", "dense.npy", "id_offsets.npy",
                                  "id_order.npy", "contents.bin", "ids.bin", "vocab.txt"])
def test_a_bit_rotten_index_file_is_refused_at_load_naming_it(index_dir, tmp_path, name):
    """Same size, other bytes: the shape checks pass, so only the recorded CRC-32 can tell. (A rotten
    doc.npy used to load, then fail inside search with an IndexError, or silently score wrong.)"""
    path = damaged_copy(index_dir, tmp_path, flip_bytes(name))
    with pytest.raises(ValueError, match=re.escape(os.path.join(path, name)) + ": damaged: its CRC-32 is"):
        BM25Retriever.load(path)


def test_verify_false_skips_the_checksum_pass_but_not_the_size_check(index_dir, tmp_path):
    rotten = damaged_copy(index_dir, tmp_path / "rotten", flip_bytes("contents.bin"))
    assert len(BM25Retriever.load(rotten, verify=False)) == len(SMALL)    # it trusts the disk's bytes
    truncated = damaged_copy(index_dir, tmp_path / "truncated", truncate_tf)
    with pytest.raises(ValueError, match=re.escape(truncated) + "/tf\\.npy: " + SIZE):
        BM25Retriever.load(truncated, verify=False)


def test_an_index_without_checksums_loads_with_a_warning(index_dir, tmp_path, capsys):
    path = damaged_copy(index_dir, tmp_path, edit_meta(files=None))
    loaded = BM25Retriever.load(path)
    assert loaded.search(["capital city"]) == BM25Retriever(SMALL).search(["capital city"])
    assert re.fullmatch(f"retriever: warning: {re.escape(path)} records no file sizes or checksums .*\n",
                        capsys.readouterr().err)


def test_an_index_written_before_dense_rows_existed_makes_them_at_load_and_scores_the_same(index_dir, tmp_path):
    def as_before(d):
        meta = json.loads((d / "meta.json").read_text())
        for name in ("dense.npy", "dense_words.npy"):
            (d / name).unlink()
            del meta["files"][name]
        del meta["dense_words"]
        (d / "meta.json").write_text(json.dumps(meta))
    loaded, built = BM25Retriever.load(damaged_copy(index_dir, tmp_path, as_before)), BM25Retriever(SMALL)
    np.testing.assert_array_equal(loaded._dense, built._dense)
    for query in ["the city", "capital the city of", "shakespeare the the"]:
        np.testing.assert_array_equal(loaded.scores(query), reference(SMALL).get_scores(tokenize(query)))


def test_index_records_the_size_and_crc32_of_every_other_file(index_dir):
    files = json.loads((index_dir / "meta.json").read_text())["files"]
    assert sorted(files) == sorted(p.name for p in index_dir.iterdir() if p.name != "meta.json")
    for name, record in files.items():
        data = (index_dir / name).read_bytes()
        assert record == {"bytes": len(data), "crc32": f"{zlib.crc32(data):08x}"}


def test_loading_a_missing_directory_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope")) + ": no such index directory"):
        BM25Retriever.load(str(tmp_path / "nope"))


@pytest.mark.slow
def test_index_command_then_serve_index_answers_like_the_corpus(tmp_path):
    corpus = write_corpus(tmp_path / "c.jsonl", SMALL)
    built = subprocess.run([sys.executable, str(REPO / "retriever.py"), "index", "--corpus", corpus,
                            "--out", str(tmp_path / "index"), "--k1", "1.2"], capture_output=True, text=True)
    assert built.returncode == 0 and "indexed 6 passages" in built.stderr, built.stderr
    refused = subprocess.run([sys.executable, str(REPO / "retriever.py"), "serve", "--index", str(tmp_path / "index"),
                              "--b", "0.5"], capture_output=True, text=True)
    assert refused.returncode == 2 and "--b: an index's parameters are fixed when it is built" in refused.stderr
    process = subprocess.Popen([sys.executable, str(REPO / "retriever.py"), "serve", "--index", str(tmp_path / "index"),
                                "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        match = re.search(r"http://127\.0\.0\.1:\d+/retrieve", process.stdout.readline())
        assert match, process.stderr.read() if process.poll() is not None else ""
        queries = ["capital city", "Shakespeare", "xylophone"]
        assert HTTPRetriever(match.group(0)).search(queries) == BM25Retriever(SMALL, k1=1.2).search(queries)
    finally:
        process.terminate()
        process.wait(timeout=10)
        process.stdout.close()
        process.stderr.close()


@pytest.mark.slow
def test_serve_refuses_a_bit_rotten_index_in_one_line_unless_told_not_to_verify(index_dir, tmp_path):
    path = damaged_copy(index_dir, tmp_path, flip_bytes("contents.bin"))
    done = run_cli("serve", "--index", path, "--port", "0")
    assert done.returncode == 2 and re.fullmatch(f"error: {re.escape(path)}/contents\\.bin: damaged: .*\n", done.stderr)
    process = subprocess.Popen([sys.executable, str(REPO / "retriever.py"), "serve", "--index", path, "--port", "0",
                                "--no-verify"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert re.search(r"http://127\.0\.0\.1:\d+/retrieve", process.stdout.readline())   # it trusts the disk
    finally:
        process.terminate()
        process.wait(timeout=10)
        process.stdout.close()
        process.stderr.close()

# ---------------------------------------------------------------------------------------------
# Progress of long builds


@pytest.fixture
def progress_at_once(monkeypatch):
    """Progress shown from the first moment, every update, in batches of 64 passages."""
    monkeypatch.setattr(R, "_PROGRESS_DELAY", 0.0)
    monkeypatch.setattr(R, "_PROGRESS_EVERY", 0.0)
    monkeypatch.setattr(R, "_PROGRESS_BATCH", 64)


def test_building_an_index_shows_a_progress_bar(progress_at_once, capsys):
    BM25Retriever(zipf_corpus(300, seed=11))
    err = capsys.readouterr().err
    assert "retriever: indexing" in err and "300/300" in err       # tqdm's bar, run to its end
    assert "retriever: placing postings" in err


def test_without_tqdm_progress_is_printed_as_lines(progress_at_once, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)                  # `from tqdm import tqdm` fails
    BM25Retriever(zipf_corpus(300, seed=11))
    lines = capsys.readouterr().err.splitlines()
    indexing = [line for line in lines if line.startswith("retriever: indexing: ")]
    assert [line.split(" passages")[0] for line in indexing] == \
        [f"retriever: indexing: {n} of 300" for n in (64, 128, 192, 256, 300)]
    assert all(re.fullmatch(r"retriever: indexing: \d+ of 300 passages in \d+ s", line) for line in indexing)
    assert re.fullmatch(r"retriever: placing postings: 1 of 1 chunks in \d+ s", lines[-1])


def test_index_command_and_from_jsonl_show_each_stage(progress_at_once, small_chunks, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c.jsonl", zipf_corpus(300, seed=12))
    R.write_index(corpus, str(tmp_path / "index"))
    err = capsys.readouterr().err
    assert all(f"retriever: {stage}" in err for stage in ("indexing", "placing postings", "checksums")), err
    BM25Retriever.load(str(tmp_path / "index"))
    assert f"retriever: verifying {tmp_path / 'index'}" in capsys.readouterr().err
    BM25Retriever.from_jsonl(corpus)
    err = capsys.readouterr().err
    assert f"retriever: reading {corpus}" in err and "retriever: indexing" in err


def test_progress_false_and_a_quick_build_print_nothing(progress_at_once, tmp_path, capsys, monkeypatch):
    corpus = write_corpus(tmp_path / "c.jsonl", zipf_corpus(300, seed=13))
    BM25Retriever.from_jsonl(corpus, progress=False)
    R.write_index(corpus, str(tmp_path / "index"), progress=False)
    BM25Retriever.load(str(tmp_path / "index"), progress=False)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(R, "_PROGRESS_DELAY", 2.0)                 # the default: a build under 2 s is quiet
    BM25Retriever(SMALL)
    assert capsys.readouterr().err == ""
