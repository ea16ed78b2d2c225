"""ddp.py: the one-caller retriever under torchrun — every rank's searches of a turn reach the server
as one request from rank 0, the hits come back to the rank that asked, ranks with unequal work stay in
step, and a failure on rank 0 stops every rank; the precision: fp32 on CPU unless bf16 is asked for."""
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import data
import ddp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class OneAtATimeServer:
    """A Search-R1-shaped retrieval server on loopback that fails (HTTP 400, which the client does not
    retry) when two requests overlap or a query starts with "fail ", as a GPU FAISS index searched from two threads
    may; each query's one hit is the query itself. Records every request's queries."""

    def __init__(self):
        self.requests, self.overlaps, busy = [], 0, threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                alone = busy.acquire(blocking=False)
                try:
                    if alone:
                        server.requests.append(payload["queries"])
                        time.sleep(0.05)                 # long enough for a second caller to overlap
                    else:
                        server.overlaps += 1
                    failed = not alone or any(q.startswith("fail ") for q in payload["queries"])
                    body = json.dumps({"error": "busy"} if failed else {"result": [
                        [{"document": {"id": q, "contents": f"T\n{q}"}, "score": 1.0}] for q in payload["queries"]]})
                finally:
                    if alone:
                        busy.release()
                self.send_response(400 if failed else 200)
                self.send_header("Content-Length", str(len(body.encode())))
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.http.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/retrieve"

    def close(self):
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def server():
    s = OneAtATimeServer()
    yield s
    s.close()


def run_two_ranks(tmp_path, tokenizer_dir, questions, url, caller="one"):
    path = tmp_path / "questions.jsonl"
    data.write_jsonl(str(path), questions)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "tests", "ddp_one_caller.py"), tokenizer_dir, str(path), url, str(tmp_path), caller]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tokenizer_dir(tokenizer, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tokenizer"))
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow
def test_one_caller_sends_each_turns_searches_of_every_rank_as_one_request(world, tokenizer_dir, server, tmp_path):
    # 5 questions: rank 0 has 3 (two chunks of 2), rank 1 has 2 (one chunk), and each question searches
    # 1-3 times, so the ranks finish at different turns and in different numbers of rollout() calls
    questions = world.test[:5]
    done = run_two_ranks(tmp_path, tokenizer_dir, questions, server.url)
    assert done.returncode == 0, done.stderr[-3000:]
    assert server.overlaps == 0
    records = [r for rank in (0, 1) for r in json.load(open(tmp_path / f"rank{rank}.json"))]
    assert sorted(r["question"] for r in records) == sorted(q["question"] for q in questions)
    for r in records:                                  # each rank got the hits of its own queries, in order
        wanted = 1 + len(r["question"]) % 3
        assert r["queries"] == [f"{r['question']} {k}" for k in range(wanted)]
        assert [[hit["contents"] for hit in hits] for hits in r["hits"]] == [[f"T\n{q}"] for q in r["queries"]]
    sent = [q for request in server.requests for q in request]
    assert sorted(sent) == sorted(q for r in records for q in r["queries"])
    # one request per turn that searched, holding both ranks' queries whenever both searched in that turn
    assert len(server.requests) < sum(len(r["queries"]) for r in records)
    assert any({q.rsplit(" ", 1)[0] for q in request} & {r["question"] for r in records[:3]}
               and {q.rsplit(" ", 1)[0] for q in request} & {r["question"] for r in records[3:]}
               for request in server.requests)


@pytest.mark.slow
def test_a_failure_of_the_one_caller_stops_every_rank_with_the_reason(world, tokenizer_dir, server, tmp_path):
    questions = [dict(world.test[0], question="fail"), *world.test[1:4]]
    done = run_two_ranks(tmp_path, tokenizer_dir, questions, server.url)
    assert done.returncode != 0
    assert done.stderr.count("retrieval on rank 0 (the one caller) failed") >= 2, done.stderr[-3000:]


def test_one_caller_is_the_retriever_itself_in_one_process():
    calls = []

    class Recorder:
        def search(self, queries, topk):
            calls.append((list(queries), topk))
            return [[{"contents": q}] for q in queries]

    one = ddp.OneCallerRetriever(Recorder(), ddp.Dist())
    assert one.search(["a", "b"], topk=2) == [[{"contents": "a"}], [{"contents": "b"}]] and calls == [(["a", "b"], 2)]
    assert one.collective


def test_on_master_and_gather_objects_are_the_identity_in_one_process():
    assert ddp.on_master(ddp.Dist(), lambda: [1, 2]) == [1, 2]
    assert ddp.gather_objects(ddp.Dist(), ["a", "b"]) == ["a", "b"]
    with pytest.raises(KeyError):                       # rank 0's own error, as it was raised
        ddp.on_master(ddp.Dist(), lambda: {}["missing"])


def test_precision_auto_is_fp32_on_cpu_and_bf16_on_gpu_and_bf16_autocast_is_taken_only_when_set():
    assert ddp.resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert ddp.resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert ddp.resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ValueError, match="--precision 'fp16'"):
        ddp.resolve_precision("fp16", torch.device("cpu"))
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with ddp.autocast(ddp.Dist()):
        assert (a @ b).dtype == torch.float32
    with ddp.autocast(ddp.Dist(precision="bf16")):
        assert (a @ b).dtype == torch.bfloat16
    assert "precision: bf16 on CPU" in ddp.precision_line(ddp.Dist(precision="bf16"))
    assert isinstance(ddp.native_bf16_cpu(), bool)
