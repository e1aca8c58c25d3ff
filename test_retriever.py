"""Tests for retriever.py: the FlashRAG readers, BM25 against rank_bm25, the retrieval-server client against a
scripted server and against retriever.py's own (`--serve`), and the command line. Offline, on the CPU.

    python -m pytest -q test_retriever.py
"""
import http.client
import http.server
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from rank_bm25 import BM25Okapi

import retriever as r
from conftest import search_r1_answer, serve

# ------------------------------------------------------------------ corpus ---

GOOD = b'{"id": "a", "contents": "T\\ntext"}\n\n'  # line 1, then a blank line 2


def test_load_corpus_parses_title_and_text(tmp_path):
    path = tmp_path / "corpus.jsonl"
    rows = [{"id": 7, "contents": "Paris\n Paris is the capital.\nOf France. "},
            {"id": "b", "contents": "no title here"}]
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    assert r.load_corpus(path) == [
        {"id": "7", "title": "Paris", "text": "Paris is the capital.\nOf France."},
        {"id": "b", "title": "", "text": "no title here"}]


@pytest.mark.parametrize("bad_line, expected", [
    (b"{not json", "invalid JSON"),
    (b'["a list"]', "JSON object"),
    (b'{"id": "x"}', '"contents"'),
    (b'{"id": "x", "contents": "  "}', '"contents"'),
    (b'{"contents": "T\\ntext"}', '"id"'),
    (b'{"id": "a", "contents": "Dup\\ntext"}', "duplicate id"),
    ('{"id": "z", "contents": "Caf\xe9\\ntext"}'.encode("latin-1"), "UTF-8"),
])
def test_bad_line_reports_file_and_line(tmp_path, bad_line, expected):
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(GOOD + bad_line + b"\n")
    with pytest.raises(ValueError) as error:
        r.load_corpus(path)
    assert str(error.value).startswith(f"{path}:3: ")
    assert expected in str(error.value)


def test_byte_order_mark_on_the_first_line_is_ignored(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD + GOOD.replace(b'"a"', b'"b"'))
    assert [doc["id"] for doc in r.load_corpus(path)] == ["a", "b"]
    path.write_bytes(GOOD + b"\xef\xbb\xbf" + GOOD.replace(b'"a"', b'"b"'))  # only the file's start
    with pytest.raises(ValueError) as error:
        r.load_corpus(path)
    assert str(error.value).startswith(f"{path}:3: invalid JSON")


def test_empty_corpus_names_the_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n")
    with pytest.raises(ValueError, match="empty.jsonl"):
        r.load_corpus(path)


def test_missing_corpus_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        r.load_corpus(tmp_path / "nope.jsonl")


def test_a_directory_is_reported_as_a_directory(tmp_path):
    for load, what in [(r.load_corpus, "corpus"), (r.load_questions, "question")]:
        with pytest.raises(IsADirectoryError, match=f"^{what} file is a directory: {tmp_path} "):
            load(tmp_path)


@pytest.mark.parametrize("path, name", [
    ("flashrag/nq/questions.jsonl", "NQ"), ("flashrag/hotpotqa/sample.jsonl", "HotpotQA"),
    ("flashrag/nq/test.jsonl", "NQ"), ("flashrag/nq/triviaqa_dev.jsonl", "TriviaQA"),   # the file's name first
    ("mine/questions.jsonl", "questions"), ("mine/test.jsonl", "mine"),
])
def test_benchmark_name_from_a_benchmark_folder(path, name):
    assert r.benchmark_name(path) == name


QUESTION = '{"question": "q?", "golden_answers": ["a"]}\n'


@pytest.mark.parametrize("bad_id", [["a", "b"], {"x": 1}, 1.5, True])
def test_a_question_id_that_is_not_a_string_or_integer_names_file_and_line(tmp_path, bad_id):
    path = tmp_path / "q.jsonl"
    path.write_text(QUESTION + json.dumps({"id": bad_id, "question": "q?", "golden_answers": ["a"]}) + "\n")
    with pytest.raises(r.DataError, match=f"^{path}:2: \"id\" must be a string or an integer, got "):
        r.load_questions(path)


def test_questions_without_an_id_or_with_a_null_one_are_named_by_their_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(QUESTION + '{"id": null, "question": "q?", "golden_answers": ["a"]}\n'
                    '{"id": 7, "question": "q?", "golden_answers": ["a"]}\n')
    assert [q["id"] for q in r.load_questions(path)] == [f"{path}:1", f"{path}:2", 7]


def test_a_question_too_long_for_a_context_names_file_and_line(tmp_path):
    path = tmp_path / "q.jsonl"
    long = json.dumps({"question": "why " * 25_000 + "?", "golden_answers": ["a"]})
    path.write_text(QUESTION + long + "\n")
    with pytest.raises(r.DataError, match=f"^{path}:2: the question is 100,001 characters long; questions are "
                                          "limited to 2,000"):
        r.load_questions(path)
    path.write_text(json.dumps({"question": "x" * r.MAX_QUESTION_CHARS, "golden_answers": ["a"]}) + "\n")
    assert len(r.load_questions(path)) == 1


def test_tokenize():
    assert r.tokenize("Born in 1981, O'Neil's NEW-York!") == \
        ["born", "in", "1981", "o", "neil", "s", "new", "york"]


# ---------------------------------------------------- BM25 vs rank_bm25 ---

def zipf_corpus(n, vocab_size, seed):
    """n passages of 5-40 made-up words drawn from a Zipf law (the r-th commonest word has probability ~ 1/r),
    each titled with two rare words."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, vocab_size + 1)
    lengths = rng.integers(5, 41, size=n)
    words = rng.choice(vocab_size, size=int(lengths.sum()), p=p / p.sum())
    titles = rng.integers(vocab_size // 2, vocab_size, size=(n, 2))
    ends = np.cumsum(lengths)
    return [{"id": str(i), "title": f"w{a} w{b}", "text": " ".join(f"w{w}" for w in words[end - size:end])}
            for i, ((a, b), end, size) in enumerate(zip(titles, ends, lengths))]


@pytest.fixture(scope="module")
def world():
    """3000 passages of 5-40 Zipf words: varied lengths exercise the length
    normalisation, and the commonest words sit in over half the passages,
    which exercises rank_bm25's epsilon floor on negative idf."""
    docs = zipf_corpus(3000, vocab_size=3000, seed=1)
    bm25 = BM25Okapi([r.passage_tokens(doc) for doc in docs])
    assert bm25.epsilon * bm25.average_idf in bm25.idf.values()  # floor is used
    rng = np.random.default_rng(2)
    queries = [" ".join(rng.choice(docs[i]["text"].split(), 6)) for i in rng.integers(0, 3000, 40)]
    queries += [docs[i]["title"] for i in range(10)]
    return r.build_index(docs, show_progress=False), bm25, queries


def reference_top(scores, k):
    """rank_bm25's scores ordered by score descending, then index ascending."""
    return list(np.lexsort((np.arange(len(scores)), -scores))[:k])


def test_scores_equal_rank_bm25(world):
    index, bm25, queries = world
    for query in queries:
        np.testing.assert_array_equal(r.bm25_scores(index, query), bm25.get_scores(r.tokenize(query)))


def test_search_top_k_matches_rank_bm25(world):
    index, bm25, queries = world
    for query, hits in zip(queries, r.search(index, queries, 10)):
        ref = bm25.get_scores(r.tokenize(query))
        assert [hit["id"] for hit in hits] == [index.docs[i]["id"] for i in reference_top(ref, 10)]
        assert [hit["score"] for hit in hits] == sorted(ref, reverse=True)[:10]


def test_repeated_and_unknown_terms_like_rank_bm25(world):
    index, bm25, _ = world
    common, rare = r.tokenize(index.docs[0]["text"])[0], r.tokenize(index.docs[5]["title"])[0]
    for query in [f"{rare} {rare} {rare}", f"{common} {common} qqqunknown {rare}", "qqqunknown zzz"]:
        np.testing.assert_array_equal(r.bm25_scores(index, query), bm25.get_scores(r.tokenize(query)))
    assert not r.bm25_scores(index, "qqqunknown zzz").any()
    # No passage shares a word with the query: no hits (not the first k passages of the file).
    assert r.search(index, ["qqqunknown", f"qqqunknown {rare}"], 3) == \
        [[], r.search(index, [rare], 3)[0]]


def test_ties_go_to_lower_index_and_k_is_capped():
    docs = [{"id": f"d{i}", "title": "", "text": text}
            for i, text in enumerate(["cat", "dog", "cat", "bird", "cat", "dog",
                                      "eel", "eel", "ant", "ant", "fly", "fly"])]
    index = r.build_index(docs, show_progress=False)
    assert [h["id"] for h in r.search(index, ["cat"], 2)[0]] == ["d0", "d2"]
    hits = r.search(index, ["bird dog"], 100)[0]  # bird is rarer than dog; the rest share no word
    assert [h["id"] for h in hits] == ["d3", "d1", "d5"]
    with pytest.raises(TypeError):
        r.search(index, "cat", 1)


def test_hits_are_the_passages_sharing_a_query_word_whatever_their_score():
    # 4 passages: "a" is in half of them, so its idf is 0; "b" is in all, so its idf is
    # negative and rank_bm25 floors it at epsilon * mean idf, negative here too.
    docs = [{"id": str(i), "title": "", "text": text} for i, text in enumerate(["a b", "a b", "b", "b"])]
    index = r.build_index(docs, show_progress=False)
    bm25 = BM25Okapi([r.passage_tokens(doc) for doc in docs])
    for query, ids in [("a", ["0", "1"]), ("b", ["0", "1", "2", "3"]), ("a zzz", ["0", "1"]), ("zzz", [])]:
        hits = r.search(index, [query], 10)[0]
        assert [h["id"] for h in hits] == ids
        assert [h["score"] for h in hits] == [bm25.get_scores(r.tokenize(query))[int(i)] for i in ids]
    assert r.search(index, ["a"], 10)[0][0]["score"] == 0.0 and r.search(index, ["b"], 10)[0][0]["score"] < 0


def test_local_searcher(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"id": i, "contents": c}) for i, c in enumerate(
        ["Paris\nParis is the capital of France.", "Rome\nRome is in Italy.", "Oslo\nOslo is cold."])))
    searcher = r.local_searcher(path, show_progress=False)
    assert [[h["title"] for h in hits] for hits in searcher(["capital of France", "italy"], 1)] == \
        [["Paris"], ["Rome"]]


def test_local_searcher_cuts_a_huge_passage_and_says_so_once(tmp_path, capsys):
    path = tmp_path / "corpus.jsonl"
    huge = "capital " + "x" * 5_000_000
    path.write_text(json.dumps({"id": "big", "contents": "Huge\n" + huge}) + "\n"
                    + json.dumps({"id": "small", "contents": "Paris\nParis is the capital."}))
    searcher = r.local_searcher(path, show_progress=False)
    for _ in range(2):  # reported on the first search only
        hits = {h["id"]: h for h in searcher(["capital"], 2)[0]}
    assert hits["big"]["text"] == huge[:r.MAX_PASSAGE_CHARS] and hits["big"]["truncated"] is True
    assert "truncated" not in hits["small"] and hits["small"]["text"] == "Paris is the capital."
    # BM25 still scores the whole passage
    full = r.search(r.build_index(r.load_corpus(path), show_progress=False), ["capital"], 2)[0]
    assert [hits[h["id"]]["score"] for h in full] == [h["score"] for h in full]
    assert capsys.readouterr().err == \
        "retriever: passage 'big' ('Huge') cut from 5,000,008 to 20,000 characters (--max-passage-chars)\n"
    with pytest.raises(ValueError, match="max_chars"):
        r.local_searcher(path, max_chars=0)


# ---------------------------------------------------------- remote server ---

def test_remote_one_request_per_batch():
    with serve(lambda req, n: (200, search_r1_answer(req), 0)) as (url, server):
        results = r.remote_searcher(url, retries=0)(["a", "b", "c"], 2)
    assert server.requests == [{"queries": ["a", "b", "c"], "topk": 2, "return_scores": True}]
    assert [len(hits) for hits in results] == [2, 2, 2]
    assert results[1][1] == {"id": "b-1", "title": "Title b", "text": "text 1", "score": 9.0}


def test_remote_answer_without_scores_or_ids():
    answer = {"result": [[{"contents": "T\nx"}]]}
    with serve(lambda req, n: (200, answer, 0)) as (url, _):
        assert r.remote_searcher(url)(["q"], 1) == [[{"id": None, "title": "T", "text": "x", "score": None}]]


def test_remote_cuts_long_passages_and_says_so(capsys):
    answer = {"result": [[{"document": {"id": 1, "contents": "T\n" + "y" * 50}, "score": 2.0},
                          {"contents": "U\n" + "z" * 50}]]}  # no id: reported by title
    with serve(lambda req, n: (200, answer, 0)) as (url, _):
        hits = r.remote_searcher(url, max_chars=10)(["q"], 2)[0]
    assert hits == [{"id": "1", "title": "T", "text": "y" * 10, "score": 2.0, "truncated": True},
                    {"id": None, "title": "U", "text": "z" * 10, "score": None, "truncated": True}]
    assert capsys.readouterr().err.splitlines() == [
        "retriever: passage '1' ('T') cut from 50 to 10 characters (--max-passage-chars)",
        "retriever: passage None ('U') cut from 50 to 10 characters (--max-passage-chars)"]


def test_remote_retries_5xx_then_succeeds():
    def plan(req, n):
        return (500, b"busy", 0) if n <= 2 else (200, search_r1_answer(req), 0)
    with serve(plan) as (url, server):
        results = r.remote_searcher(url, retries=3, backoff=0.001)(["a"], 1)
    assert len(server.requests) == 3 and results[0][0]["id"] == "a-0"


def test_remote_announces_each_retry_on_stderr(capsys):
    def plan(req, n):
        return (503, b"busy", 0) if n == 1 else (200, search_r1_answer(req), 1.5 if n == 2 else 0)
    with serve(plan) as (url, _):
        r.remote_searcher(url, timeout=0.5, retries=3, backoff=0.001)(["a"], 1)
    assert capsys.readouterr().err.splitlines() == [
        f"retrieval server {url}: HTTP 503, body: 'busy'; retry 1 of 3 in 0.001 s",
        f"retrieval server {url}: timeout (no answer within 0.5 s); retry 2 of 3 in 0.002 s"]


def test_remote_gives_up_with_url_status_and_body():
    with serve(lambda req, n: (500, b"index exploded on shard 3", 0)) as (url, server), \
            pytest.raises(RuntimeError) as error:
        r.remote_searcher(url, retries=2, backoff=0.001)(["a"], 1)
    assert len(server.requests) == 3
    assert url in str(error.value) and "500" in str(error.value)
    assert "index exploded on shard 3" in str(error.value)


def test_remote_4xx_fails_without_retry():
    with serve(lambda req, n: (422, b"topk must be positive", 0)) as (url, server), \
            pytest.raises(RuntimeError, match="422.*topk must be positive"):
        r.remote_searcher(url, retries=3, backoff=0.001)(["a"], 0)
    assert len(server.requests) == 1


def test_remote_timeout():
    with serve(lambda req, n: (200, search_r1_answer(req), 1.0)) as (url, server):
        start = time.perf_counter()
        with pytest.raises(RuntimeError, match="timeout") as error:
            r.remote_searcher(url, timeout=0.2, retries=1, backoff=0.001)(["a"], 1)
        assert time.perf_counter() - start < 0.9
    assert url in str(error.value) and len(server.requests) == 2


def test_remote_timeout_bounds_the_whole_answer_not_each_read():
    """A byte every 0.1 s never lets one read wait 0.5 s, but the whole answer would take 6 s."""
    with serve(lambda req, n: (200, {"result": [[], []]}, 0, 0.1)) as (url, server):
        start = time.perf_counter()
        with pytest.raises(r.RetrievalError, match=r"failed after 2 attempts; last error: timeout \(no answer "
                                                   r"within 0.5 s\)"):
            r.remote_searcher(url, timeout=0.5, retries=1, backoff=0.001)(["a", "b"], 1)
        assert time.perf_counter() - start < 1.5 and len(server.requests) == 2


def test_remote_trickled_answer_within_the_timeout_is_read():
    with serve(lambda req, n: (200, {"result": [[]]}, 0, 0.001)) as (url, _):
        assert r.remote_searcher(url, timeout=5, retries=0)(["a"], 1) == [[]]


@pytest.mark.parametrize("answer, problem", [
    ({"result": [[{"document": {"id": 1, "contents": "T\nx"}, "score": "high"}]]}, "\"score\" must be a number"),
    ({"result": [[{"document": {"id": 1, "contents": "T\nx"}, "score": [1]}]]}, "\"score\" must be a number"),
    ({"result": [[], []]}, "with 1 lists"),                          # 2 lists for 1 query
    ({"result": [{"document": {}}]}, "one list of hits per query"),  # hits not in a list
    ({"result": [["a hit"]]}, "expected a hit like"),
    ([1, 2], "expected {'result'"),
    (b"<html>oops</html>", "non-JSON"),
])
def test_remote_malformed_answer_is_a_failed_request_retried_then_refused(answer, problem, capsys):
    with serve(lambda req, n: (200, answer, 0)) as (url, server), pytest.raises(r.RetrievalError) as error:
        r.remote_searcher(url, retries=2, backoff=0.001)(["a"], 1)
    assert len(server.requests) == 3 and problem in str(error.value)
    assert str(error.value).startswith(f"retrieval server {url} failed after 3 attempts; last error: ")
    assert len(capsys.readouterr().err.splitlines()) == 2                  # each retry announced


def test_remote_malformed_answer_then_a_good_one():
    def plan(req, n):
        return (200, {"result": [[{"document": {"contents": "T\nx"}, "score": "?"}]]}, 0) if n == 1 \
            else (200, search_r1_answer(req), 0)
    with serve(plan) as (url, server):
        assert r.remote_searcher(url, retries=1, backoff=0.001)(["a"], 1)[0][0]["id"] == "a-0"
    assert len(server.requests) == 2


@pytest.mark.parametrize("url, timeout, message", [
    ("notaurl", 1, "'notaurl' is not an http:// or https:// URL"), ("http://h:port/x", 1, "not a valid URL"),
    ("ftp://h/x", 1, "not an http:// or https:// URL"), ("http://h/x", float("inf"), "positive, finite"),
    ("http://h/x", float("nan"), "positive, finite"), ("http://h/x", 0, "positive, finite"),
])
def test_remote_searcher_refuses_a_bad_url_or_timeout_at_once(url, timeout, message):
    with pytest.raises(ValueError, match=message):
        r.remote_searcher(url, timeout=timeout)


@pytest.mark.parametrize("answer", [
    {"result": [[]]},                            # 1 list for 2 queries
    {"results": [[], []]},                       # wrong key
    {"result": [[{"document": {"id": 1}}], []]},  # no contents
    b"<html>oops</html>",                        # not JSON
])
def test_remote_malformed_answer(answer):
    with serve(lambda req, n: (200, answer, 0)) as (url, _), \
            pytest.raises(RuntimeError, match="expected|non-JSON"):
        r.remote_searcher(url, retries=0)(["a", "b"], 1)


# ------------------------------------------------ remote server: retriever.py --serve ---

CORPUS = Path(__file__).parent / "data" / "corpus.jsonl"


def test_server_gives_exactly_the_local_searchers_hits(bm25_server):
    url, _ = bm25_server
    queries = ["where was Treikar Komers born", "chemist near Guthmere", "farmer", "qqqunknown zzz",
               "Treikar Komers"]
    remote = r.remote_searcher(url, retries=0)(queries, 5)
    assert remote == r.local_searcher(CORPUS, show_progress=False)(queries, 5)   # ids, titles, texts, scores
    assert remote[3] == [] and all(len(hits) == 5 for i, hits in enumerate(remote) if i != 3)
    assert remote[0][0]["title"] == "Treikar Komers" and remote[0][0]["text"] == "Treikar Komers was born in Bruthholt."


def test_server_sends_flashrag_contents_and_scores_only_when_asked(bm25_server):
    _, port = bm25_server
    corpus = {row["id"]: row["contents"] for row in map(json.loads, CORPUS.read_text().splitlines())}
    request = {"queries": ["where was Treikar Komers born", "qqqunknown"], "topk": 2}
    status, bare = post(port, json.dumps(request).encode())                     # return_scores: false by default
    assert status == 200 and [len(hits) for hits in bare["result"]] == [2, 0]
    assert all(set(hit) == {"id", "contents"} and hit["contents"] == corpus[hit["id"]] for hit in bare["result"][0])
    status, scored = post(port, json.dumps({**request, "return_scores": True}).encode())
    assert [hit["document"] for hit in scored["result"][0]] == bare["result"][0]
    assert all(set(hit) == {"document", "score"} and isinstance(hit["score"], float) for hit in scored["result"][0])


def post(port, body, method="POST", path="/retrieve", headers=None):
    """One request through http.client, with exactly the headers given (Content-Length by default):
    (status, decoded JSON answer)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        for name, value in ({"Content-Length": str(len(body))} if headers is None else headers).items():
            connection.putheader(name, value)
        connection.endheaders(body)
        response = connection.getresponse()
        assert response.getheader("Content-Type") == "application/json"
        return response.status, json.loads(response.read())
    finally:
        connection.close()


GOOD_REQUEST = {"queries": ["Treikar Komers"], "topk": 1}
TREIKAR = "Treikar Komers\nTreikar Komers was born in Bruthholt."        # its best hit's contents


def body_of(**changes):
    return json.dumps({key: value for key, value in {**GOOD_REQUEST, **changes}.items() if value != "DROP"}).encode()


@pytest.mark.parametrize("args, status, message", [
    ((b"\xff\xfe{}",), 400, "the body is not UTF-8"),
    ((b"{queries",), 400, "the body is not JSON"),
    ((b"[" * 100_000,), 400, "nested too deeply"),
    ((b'["queries"]',), 400, "the body must be a JSON object, got list"),
    ((body_of(queries="DROP"),), 400, '"queries" must be a list of strings, got null'),
    ((body_of(queries="one string"),), 400, '"queries" must be a list of strings, got "one string"'),
    ((body_of(queries=["a", 1]),), 400, '"queries" must be a list of strings'),
    ((body_of(topk="DROP"),), 400, '"topk" must be an integer from 1 to 100, got null'),
    ((body_of(topk=0),), 400, '"topk" must be an integer from 1 to 100, got 0'),
    ((body_of(topk=-1),), 400, '"topk" must be an integer from 1 to 100, got -1'),
    ((body_of(topk=101),), 400, '"topk" must be an integer from 1 to 100, got 101'),
    ((body_of(topk=2.0),), 400, '"topk" must be an integer from 1 to 100, got 2.0'),
    ((body_of(topk="3"),), 400, '"topk" must be an integer from 1 to 100, got "3"'),
    ((body_of(topk=True),), 400, '"topk" must be an integer from 1 to 100, got true'),
    ((body_of(return_scores="yes"),), 400, '"return_scores" must be true or false, got "yes"'),
    ((body_of(return_scores=1),), 400, '"return_scores" must be true or false, got 1'),
    # Without a body where the server reads none: closing on unread bytes may reset the connection.
    ((b"", "POST", "/retrieve", {}), 411, "send a Content-Length header"),
    ((b"", "POST", "/retrieve", {"Content-Length": "many"}), 400, "Content-Length must be a number"),
    ((b"", "POST", "/retrieve", {"Content-Length": "-5"}), 400, "Content-Length must be a number"),
    ((b" " * 1_000_001,), 413, "over the server's cap of 1,000,000 bytes (Content-Length: 1000001)"),
    ((b"", "POST", "/retrieve", {"Content-Length": "9" * 5000}), 413, "cap of 1,000,000 bytes"),  # not drained
    ((body_of(), "POST", "/search"), 404, "no such path '/search'; POST to /retrieve"),
    ((b"", "GET", "/search"), 404, "no such path '/search'"),
    ((b"", "GET"), 405, "use POST for /retrieve, not GET"),
    ((b"", "PUT"), 405, "use POST for /retrieve, not PUT"),
    ((b"", "BREW"), 501, "Unsupported method ('BREW')"),
])
def test_server_refuses_a_bad_request_with_a_4xx_that_says_why_and_goes_on(bm25_server, args, status, message):
    _, port = bm25_server
    answer_status, answer = post(port, *args)
    assert (answer_status, set(answer)) == (status, {"error"}) and message in answer["error"]
    if status == 400 and "Content-Length" not in message:                    # how to do it right, too
        assert answer["error"].endswith(f"; send e.g. {r.EXAMPLE_REQUEST}")
    assert post(port, body_of()) == (200, {"result": [[{"id": "d00932", "contents": TREIKAR}]]})  # still serving


def test_server_takes_a_burst_of_64_clients_at_once(bm25_server):
    """All the ranks of a run may ask at the same moment: none may wait for a dropped connection's retry (1 s)."""
    url, _ = bm25_server
    searcher, seconds = r.remote_searcher(url, retries=0), []

    def ask():
        start = time.perf_counter()
        if searcher(["where was Treikar Komers born"] * 8, 3)[0][0]["id"] == "d00932":
            seconds.append(time.perf_counter() - start)
    clients = [threading.Thread(target=ask) for _ in range(64)]
    for client in clients:
        client.start()
    for client in clients:
        client.join()
    assert len(seconds) == 64 and max(seconds) < 0.9


def test_server_answers_its_own_failure_with_a_500_and_goes_on(bm25_server, monkeypatch, capsys):
    _, port = bm25_server

    def broken(*args):
        raise MemoryError("out of memory")
    monkeypatch.setattr(r, "search", broken)
    assert post(port, body_of()) == (500, {"error": "the server failed: MemoryError('out of memory')"})
    assert "Traceback" in capsys.readouterr().err                             # for whoever runs the server
    monkeypatch.undo()
    assert post(port, body_of()) == (200, {"result": [[{"id": "d00932", "contents": TREIKAR}]]})


TINY = [{"id": "1", "title": "Paris", "text": "capital of France"}, {"id": "2", "title": "", "text": "no title"}]


def test_answer_request_is_the_protocol_without_sockets():
    index = r.build_index(TINY, show_progress=False)
    paris, untitled = {"id": "1", "contents": "Paris\ncapital of France"}, {"id": "2", "contents": "\nno title"}
    assert r.answer_request(index, b'{"queries": ["france", "title", "oslo"], "topk": 3}') == \
        (200, {"result": [[paris], [untitled], []]})
    status, answer = r.answer_request(index, b'{"queries": ["france"], "topk": 0}')
    assert status == 400 and answer["error"].startswith('"topk" must be an integer from 1 to 100, got 0; send e.g. ')


def test_server_describes_itself_on_get():
    server = r.make_server(r.build_index(TINY, show_progress=False), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
    try:
        status, answer = post(server.server_address[1], b"", "GET", "/")
    finally:
        server.shutdown()
        server.server_close()
    assert status == 200 and answer["service"].startswith("BM25 over 2 passages")
    assert r.EXAMPLE_REQUEST in answer["usage"]


def test_serve_command_line_prints_its_url_answers_and_stops_on_sigterm():
    process = subprocess.Popen([sys.executable, "retriever.py", "--serve", "--port", "0", "--corpus",
                                "data/corpus.jsonl"], cwd=CORPUS.parent.parent, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"})  # it flushes
    try:
        assert select.select([process.stdout], [], [], 30)[0], "no line on stdout within 30 s"
        line = process.stdout.readline()
        match = re.fullmatch(r"serving data/corpus.jsonl \(3,170 passages\) at (http://127\.0\.0\.1:\d+/retrieve)\n",
                             line)
        assert match, line
        [hit] = r.remote_searcher(match[1], retries=0)(["where was Treikar Komers born"], 1)[0]
        assert (hit["id"], hit["title"]) == ("d00932", "Treikar Komers")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5) == 0                                   # a stop is not a failure
        assert process.stdout.read() == "" and process.stderr.read() == ""     # no traceback, no log
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        process.stdout.close()
        process.stderr.close()


def test_serve_command_line_refuses_queries_and_a_taken_port(bm25_server, capsys, monkeypatch):
    monkeypatch.setattr(r, "serve_until_stopped", lambda *args: pytest.fail("it serves (until killed)"))
    for argv, message in [(["--serve", "a query"], "--serve takes no queries, --url or --check"),
                          (["--serve", "--port", "70000"], "argument --port: must be from 0 to 65535, got 70000")]:
        with pytest.raises(SystemExit) as error:
            r.main(argv)
        assert error.value.code == 2 and message in capsys.readouterr().err
    _, port = bm25_server
    with pytest.raises(SystemExit) as error:
        r.main(["--serve", "--port", str(port), "--corpus", str(CORPUS)])
    assert error.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"retriever.py: cannot listen on 127.0.0.1:{port}: ") and err.endswith(" (--host, --port)\n")


# -------------------------------------------------------------- rendering ---

def test_format_hits():
    hits = [{"id": "1", "title": "Paris", "text": "Capital of France.", "score": 3.5},
            {"id": "2", "title": "", "text": "Untitled.", "score": 1.0}]
    assert r.format_hits(hits) == "Doc 1(Title: Paris) Capital of France.\nDoc 2(Title: ) Untitled."
    assert r.format_hits(hits, show_scores=True).startswith("[3.500] Doc 1(Title: Paris)")
    assert r.format_hits([]) == ""


# ------------------------------------------------------------ command line ---

def test_command_line_answers_a_query(tmp_path, capsys):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"id": i, "contents": c}) for i, c in enumerate(
        ["Paris\nParis is the capital of France.", "Rome\nRome is in Italy.", "Oslo\nOslo is cold."])))
    r.main(["--corpus", str(path), "-k", "2", "capital of France"])  # only Paris shares a word
    [hit] = r.local_searcher(path, show_progress=False)(["capital of France"], 2)[0]
    assert capsys.readouterr().out == \
        f"\n== capital of France\n[{hit['score']:.3f}] Doc 1(Title: Paris) Paris is the capital of France.\n"


def test_command_line_corpus_errors_are_one_line_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(GOOD + b"{not json\n")
    for path, message in [(tmp_path / "nope.jsonl", "corpus file not found: "), (bad, "")]:
        with pytest.raises(SystemExit) as error:
            r.main(["--corpus", str(path), "a query"])
        assert error.value.code == 1
        err = capsys.readouterr().err
        assert err.startswith(f"retriever.py: {message}{path}") and err.endswith(" (--corpus)\n")
        assert err.count("\n") == 1
    assert f"{bad}:3: invalid JSON" in err


def test_command_line_server_error_is_one_line_without_traceback(capsys):
    with serve(lambda req, n: (400, b"no such index", 0)) as (url, _), pytest.raises(SystemExit) as error:
        r.main(["--url", url, "a query"])
    assert error.value.code == 1
    assert capsys.readouterr().err == \
        f"retriever.py: retrieval server {url} rejected the request: HTTP 400, body: 'no such index'\n"


@pytest.mark.parametrize("argv, message", [
    (["-k", "0", "q"], "argument -k: must be at least 1, got 0"),
    (["-k", "-3", "q"], "argument -k: must be at least 1, got -3"),
    (["--max-passage-chars", "0", "q"], "argument --max-passage-chars: must be at least 1"),
])
def test_command_line_refuses_counts_below_1(argv, message, capsys):
    with pytest.raises(SystemExit) as error:
        r.main(argv)
    assert error.value.code == 2 and message in capsys.readouterr().err


def test_command_line_refuses_what_is_not_a_url_in_one_line(capsys):
    with pytest.raises(SystemExit) as error:
        r.main(["--url", "notaurl", "a query"])
    assert error.value.code == 1
    assert capsys.readouterr().err == ("retriever.py: --url: 'notaurl' is not an http:// or https:// URL "
                                       "(e.g. http://host:8000/retrieve)\n")


# ------------------------------------------------------------------------------------- question files ---

@pytest.mark.parametrize("path, name", [
    ("flashrag/nq/test.jsonl", "NQ"), ("flashrag/2wikimultihopqa/dev.jsonl", "2Wiki"),
    ("musique_dev.jsonl", "MuSiQue"), ("Bamboogle-test.jsonl", "Bamboogle"), ("my_questions.jsonl", "my_questions"),
])
def test_benchmark_name_from_file(path, name):
    assert r.benchmark_name(path) == name


def test_question_file_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_bytes(b'{"question": "ok?", "golden_answers": ["a"]}\n'
                     b'{"question": "caf\xe9?", "golden_answers": ["a"]}\n')             # Latin-1, not UTF-8
    with pytest.raises(ValueError, match=f"^{path}:2: not UTF-8"):
        r.load_questions(path)


def test_duplicate_question_ids_name_both_lines(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"id": "x", "question": "a?", "golden_answers": ["a"]}\n'
                    '{"id": "y", "question": "b?", "golden_answers": ["b"]}\n'
                    '{"id": "x", "question": "c?", "golden_answers": ["c"]}\n')
    with pytest.raises(ValueError, match=f"^{path}:3: duplicate id 'x' \\(first on line 1\\)"):
        r.load_questions(path)


@pytest.mark.parametrize("line, message", [
    ("{bad", "invalid JSON"),
    ('{"golden_answers": ["x"]}', 'field "question"'),
    ('{"question": "q?", "golden_answers": []}', "non-empty list"),
    ('{"question": "q?", "golden_answers": "x"}', "non-empty list"),
])
def test_bad_question_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "ok?", "golden_answers": ["a"]}\n' + line + "\n")
    with pytest.raises(ValueError, match=message) as error:
        r.load_questions(path)
    assert str(error.value).startswith(f"{path}:2: ")
