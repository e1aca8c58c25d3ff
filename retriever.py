"""The search tool of MemSearcher (BM25 over a local corpus, or a remote server), and the FlashRAG files it
works on: `load_corpus` and `load_questions` read them line by line and stop at a bad line with its
"path:line" (`DataError`).

When the agent writes <search> query </search>, the environment calls a
*searcher*: a function `searcher(queries, k)` that takes a list of query
strings and returns, for each query, its k best passages as dicts
{"id", "title", "text", "score"}; the local searcher returns only passages
that share a word with the query, so fewer than k (none for a query of
unknown words) if few do. `format_hits` renders them the way Search-R1
shows them to the model (its `_passages2string`), one passage per line,
with no space before the parenthesis:

    Doc 1(Title: Paris) Paris is the capital of France.

There are two searchers:

* `local_searcher(corpus_path)`: BM25 over a FlashRAG corpus file, in process.
* `remote_searcher(url)`: a Search-R1 retrieval server (e.g. E5 dense
  retrieval over Wikipedia) spoken to over HTTP. An answer that is not whole
  within the timeout, or not what the API promises, is a failed request:
  retried with back-off, then a `RetrievalError`.

`python retriever.py --serve` is such a server for the local BM25 index, so
that processes that would each build and hold the same index (the ranks of a
torchrun, the laptops of a workshop room) share one: build it once, point
`remote_searcher` (memsearcher.py's --retriever-url) at it. Its hits are
`local_searcher`'s, scores included, down to the last bit: JSON carries
floats exactly. It checks every request and answers a bad one with a 4xx
and a JSON {"error": what to fix}, which `remote_searcher` does not retry.

Both cut a hit's text longer than `max_chars` (20,000 characters by default,
far above real passages) so that one broken passage cannot flood the model's
context; such a hit gets "truncated": True and the cut is reported on stderr.

BM25 (the Okapi variant of the `rank_bm25` package) scores a passage d for a
query q, both seen as lists of tokens, as

    score(q, d) = sum over tokens t of q of
                  idf(t) * tf(t,d) * (k1 + 1) / (tf(t,d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t)      = ln(N - df(t) + 0.5) - ln(df(t) + 0.5)

with N passages, df(t) = number of passages containing t, tf(t,d) = count of
t in d, |d| = number of tokens of d, avgdl = mean |d|, k1 = 1.5, b = 0.75.
tf saturates (a 10th "paris" adds little), long passages are damped, and rare
words weigh more. This idf is negative for words in more than half of the
passages; rank_bm25 replaces those by epsilon * (mean idf), epsilon = 0.25.

rank_bm25 computes every score in a Python loop over all passages (about
0.2 s per query at 100k passages). Here we precompute, for every word, the
list of passages that contain it together with that word's finished BM25 term
for each of them (an *inverted index*). A query then only touches the
passages that share a word with it. The arithmetic is the same, operation by
operation, so the scores are bitwise equal to rank_bm25's; `reference_scores`
keeps rank_bm25 around to check that (`python retriever.py --check`).

Run `python retriever.py "where was Treikar Komers born" -k 3` to query
data/corpus.jsonl; `python docs/measure.py bm25 10000 100000` times it on
synthetic data. `python retriever.py --serve --port 8000` serves it at
http://127.0.0.1:8000/retrieve until Ctrl-C or SIGTERM (--host 0.0.0.0 to
let other machines in; --port 0 picks a free port and prints it).
"""

import argparse
import codecs
import contextlib
import http.client
import http.server
import itertools
import json
import math
import re
import signal
import socket
import sys
import threading
import time
import traceback
import urllib.parse
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

K1, B, EPSILON = 1.5, 0.75, 0.25  # rank_bm25.BM25Okapi defaults


# ----------------------------------------------------------------- corpus ---

def split_contents(contents: str) -> tuple[str, str]:
    """FlashRAG stores a passage as "Title\\ntext". Without a newline the
    whole string is treated as text with an empty title."""
    title, newline, text = contents.partition("\n")
    if not newline:
        return "", contents.strip()
    return title.strip(), text.strip()


class DataError(ValueError):
    """A data file the user must fix; the message starts with "path:line:" and says what is wrong."""


def read_jsonl(path, what: str):
    """Yield (where, object) for each non-blank line of a JSONL file, where = "path:line". A bad line stops
    with "path:line: what is wrong". Windows editors often save UTF-8 with a byte-order mark: json.loads
    would call it invalid JSON, and it can only be the file's first bytes, so it is dropped from line 1."""
    try:
        with open(path, "rb") as f:  # bytes, so a bad encoding is reported per line
            raw_lines = f.read().split(b"\n")
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file not found: {path}") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"{what} file is a directory: {path} (give the JSONL file in it)") from None
    raw_lines[0] = raw_lines[0].removeprefix(codecs.BOM_UTF8)
    for lineno, raw in enumerate(raw_lines, start=1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not UTF-8 ({e}); re-encode the file as UTF-8") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e}); each line must be one JSON object") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")  # noqa: TRY004
        yield where, row


def parse_corpus_row(row: dict, where: str) -> dict:
    """One corpus object -> {"id", "title", "text"}; `where` prefixes errors."""
    if not isinstance(row.get("contents"), str) or not row["contents"].strip():
        raise DataError(f"{where}: missing or empty \"contents\" (expected \"Title\\ntext\")")
    if not isinstance(row.get("id"), (str, int)) or isinstance(row["id"], bool) or row["id"] == "":
        raise DataError(f"{where}: missing or empty \"id\" (expected a string or integer)")
    title, text = split_contents(row["contents"])
    return {"id": str(row["id"]), "title": title, "text": text}


def load_corpus(path) -> list[dict]:
    """Read a FlashRAG corpus JSONL into [{"id", "title", "text"}, ...].
    Blank lines are skipped; any bad line raises DataError("path:line: ...")."""
    docs, seen = [], {}
    for where, row in read_jsonl(path, "corpus"):
        doc = parse_corpus_row(row, where)
        if doc["id"] in seen:
            raise DataError(f"{where}: duplicate id {doc['id']!r} "
                            f"(first seen on line {seen[doc['id']]}); ids must be unique")
        seen[doc["id"]] = where.rsplit(":", 1)[1]
        docs.append(doc)
    if not docs:
        raise DataError(f"{path}: the corpus contains no passages")
    return docs


# The paper's table: EM per benchmark, in this order. A question file is named by its folder when its own
# name is only a split (FlashRAG ships nq/test.jsonl, hotpotqa/dev.jsonl, ...) or the folder is one of these.
PAPER_BENCHMARKS = {"nq": "NQ", "triviaqa": "TriviaQA", "popqa": "PopQA", "hotpotqa": "HotpotQA",
                    "2wikimultihopqa": "2Wiki", "2wiki": "2Wiki", "musique": "MuSiQue", "bamboogle": "Bamboogle"}
SPLITS = ("train", "dev", "test", "val", "validation")


def benchmark_name(path) -> str:
    """'data/nq/test.jsonl' and 'data/nq/questions.jsonl' -> 'NQ'; 'musique_dev.jsonl' -> 'MuSiQue';
    'data/test.jsonl' -> 'data'; 'my_questions.jsonl' -> 'my_questions'."""
    def key(name):  # 'hotpotqa-dev' -> 'hotpotqa'
        return re.sub(rf"[_\-.]({'|'.join(SPLITS)})$", "", name.lower())
    path = Path(path)
    if key(path.stem) in PAPER_BENCHMARKS:
        return PAPER_BENCHMARKS[key(path.stem)]
    if key(path.parent.name) in PAPER_BENCHMARKS:
        return PAPER_BENCHMARKS[key(path.parent.name)]
    return path.parent.name if path.stem.lower() in SPLITS else path.stem


# Far above a real question, which is a sentence or two. Every turn's context holds the question, so a much
# longer one (a document pasted into the field by mistake) would crowd out or overflow the model's context.
MAX_QUESTION_CHARS = 2_000


def load_questions(path) -> list[dict]:
    """Read a FlashRAG question JSONL ({"id", "question", "golden_answers", ...} per line) into a list of dicts.
    Each is tagged with its benchmark ("source", from the file's name) for per-benchmark EM, and its question
    type, if any, is a string under "type" (FlashRAG keeps it in "metadata"). A line without an id gets its
    "path:line". Bad lines raise DataError, and so does a question over MAX_QUESTION_CHARS characters."""
    questions, seen = [], {}
    for where, q in read_jsonl(path, "question"):
        if not isinstance(q.get("question"), str) or not q["question"].strip():
            raise DataError(f"{where}: each line needs a non-empty string field \"question\"")
        if len(q["question"]) > MAX_QUESTION_CHARS:
            raise DataError(f"{where}: the question is {len(q['question']):,} characters long; questions are "
                            f"limited to {MAX_QUESTION_CHARS:,} (MAX_QUESTION_CHARS), as every turn's context holds it")
        gold = q.get("golden_answers")
        if not isinstance(gold, list) or not gold or not all(isinstance(g, str) for g in gold):
            raise DataError(f"{where}: \"golden_answers\" must be a non-empty list of strings")
        if q.get("id") is None:
            q["id"] = where
        elif not isinstance(q["id"], (str, int)) or isinstance(q["id"], bool):
            raise DataError(f"{where}: \"id\" must be a string or an integer, got {json.dumps(q['id'])[:100]}")
        if q["id"] in seen:
            raise DataError(f"{where}: duplicate id {q['id']!r} (first on line {seen[q['id']]})")
        seen[q["id"]] = where.rsplit(":", 1)[1]
        metadata = q.get("metadata") if isinstance(q.get("metadata"), dict) else {}
        kind = q.get("type", metadata.get("type"))
        if kind is None:
            q.pop("type", None)
        else:
            q["type"] = str(kind)
        q["source"] = benchmark_name(path)
        questions.append(q)
    if not questions:
        raise DataError(f"{path}: no questions in the file")
    return questions


# --------------------------------------------------------- passage cap ---

# Far above any real passage (wiki-18's are ~100 words, ~600 characters, and
# FlashRAG's corpora stay under 4 KB), so it only ever cuts a broken one, e.g.
# a whole book on one line, which would otherwise fill the model's context.
MAX_PASSAGE_CHARS = 20_000


def passage_cutter(max_chars: int):
    """Return cut(results) that shortens every hit's text to max_chars
    characters and marks the hit "truncated": True. Each cut passage is
    reported once on stderr: a silent cut would look like a retrieval bug."""
    if max_chars < 1:
        raise ValueError(f"max_chars must be at least 1, got {max_chars}")
    reported = set()

    def cut_hit(hit: dict) -> dict:
        if len(hit["text"]) <= max_chars:
            return hit
        if (hit["id"], hit["title"]) not in reported:  # with the title: server hits may lack ids
            reported.add((hit["id"], hit["title"]))
            print(f"retriever: passage {hit['id']!r} ({hit['title'][:60]!r}) cut from "
                  f"{len(hit['text']):,} to {max_chars:,} characters (--max-passage-chars)",
                  file=sys.stderr, flush=True)
        return {**hit, "text": hit["text"][:max_chars], "truncated": True}

    return lambda results: [[cut_hit(hit) for hit in hits] for hits in results]


# ------------------------------------------------------------- tokenizer ---

WORD = re.compile(r"\w+")


def tokenize(text: str) -> list[str]:
    """Lowercase, then keep runs of letters/digits/underscore. Names and years
    stay whole tokens ("1981", "o'neil" -> "o", "neil"), punctuation is dropped.
    No stemming or stopword list: BM25's idf already makes "the" weigh little."""
    return WORD.findall(text.lower())


def passage_tokens(doc: dict) -> list[str]:
    """What BM25 indexes: title and text, i.e. the whole FlashRAG "contents"."""
    return tokenize(doc["title"] + "\n" + doc["text"])


# ------------------------------------------------------------ BM25 index ---

class BM25Index(NamedTuple):
    """Postings in CSR layout: the passages containing term id t are
    post_docs[offsets[t]:offsets[t+1]] and their BM25 terms (idf * saturated
    tf, see the module docstring) are post_weights[same slice]."""
    docs: list[dict]
    vocab: dict[str, int]      # token -> term id
    offsets: np.ndarray        # int64[V + 1]
    post_docs: np.ndarray      # int64[P], ascending within each term
    post_weights: np.ndarray   # float64[P]
    avgdl: float


def token_ids(docs: list[dict], show_progress: bool):
    """Tokenize every passage and map tokens to ids in order of first
    appearance (the order rank_bm25 meets words in, which matters for its
    mean idf). Returns (vocab, flat int32 ids of all tokens, int64 lengths)."""
    vocab = defaultdict(itertools.count().__next__)  # unseen token -> next id
    ids, lengths = [], np.empty(len(docs), dtype=np.int64)
    bar = tqdm(docs, desc="tokenizing", disable=not show_progress, delay=2)  # shown after 2 s
    for i, doc in enumerate(bar):
        ids.append(np.fromiter(map(vocab.__getitem__, passage_tokens(doc)), dtype=np.int32))
        lengths[i] = len(ids[-1])
    return dict(vocab), np.concatenate(ids), lengths


def okapi_idf(df: np.ndarray, n_docs: int) -> np.ndarray:
    """idf per term id exactly as rank_bm25's _calc_idf: math.log (not np.log,
    whose last bit may differ) and a left-to-right sum for the mean."""
    idf = [math.log(n_docs - d + 0.5) - math.log(d + 0.5) for d in df.tolist()]
    idf_sum = 0.0
    for value in idf:  # not sum(): Python >= 3.12 sums floats with compensation
        idf_sum += value
    floor = EPSILON * idf_sum / len(idf) if idf else 0.0
    return np.array([value if value >= 0 else floor for value in idf], dtype=np.float64)


def build_index(docs: list[dict], show_progress: bool = True) -> BM25Index:
    """Build the inverted index with numpy: no per-passage Python dicts."""
    if not docs:
        raise ValueError("cannot build a BM25 index over an empty corpus")
    vocab, term_of_token, lengths = token_ids(docs, show_progress)
    n_docs, n_terms = len(docs), len(vocab)
    avgdl = int(lengths.sum()) / n_docs  # Python division, as rank_bm25
    # One key per token: term * N + doc. Sorting the keys groups tokens by
    # term, then by passage; np.unique's counts are the term frequencies.
    doc_of_token = np.repeat(np.arange(n_docs, dtype=np.int64), lengths)
    keys, tf = np.unique(term_of_token.astype(np.int64) * n_docs + doc_of_token,
                         return_counts=True)
    del doc_of_token, term_of_token
    post_terms, post_docs = np.divmod(keys, n_docs)
    df = np.bincount(post_terms, minlength=n_terms)  # passages per term
    offsets = np.concatenate([[0], np.cumsum(df)])
    idf = okapi_idf(df, n_docs)
    # Same operations in the same order as rank_bm25's get_scores, so every
    # float is identical: idf * (tf * (k1+1) / (tf + k1 * (1 - b + b*|d|/avgdl)))
    norm = K1 * (1 - B + B * lengths[post_docs] / avgdl)
    weights = idf[post_terms] * (tf * (K1 + 1) / (tf + norm))
    # post_docs stays int64: numpy would convert int32 indices on every query.
    return BM25Index(docs, vocab, offsets, post_docs, weights, avgdl)


def bm25_scores(index: BM25Index, query: str) -> np.ndarray:
    """Dense float64[N] BM25 scores of every passage for one query. Tokens
    are added in query order, repeats included, like rank_bm25; an unknown
    token adds nothing. Passages sharing no token with the query score 0."""
    scores = np.zeros(len(index.docs))
    for token in tokenize(query):
        t = index.vocab.get(token)
        if t is not None:
            start, end = index.offsets[t], index.offsets[t + 1]
            scores[index.post_docs[start:end]] += index.post_weights[start:end]
    return scores


def matching_passages(index: BM25Index, query: str) -> np.ndarray:
    """Ascending indices of the passages that contain at least one query
    token: the only ones worth returning. Not the same as score != 0: a token
    in exactly half the passages has idf 0, and where most tokens are that
    common the epsilon floor is negative (see the module docstring)."""
    matched = np.zeros(len(index.docs), dtype=bool)
    for token in tokenize(query):
        t = index.vocab.get(token)
        if t is not None:
            matched[index.post_docs[index.offsets[t]:index.offsets[t + 1]]] = True
    return np.flatnonzero(matched)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best scores, by score descending, ties broken by the
    lower passage index. Always k results (if N >= k), even if some score 0."""
    k = min(k, len(scores))
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    kth = np.partition(scores, len(scores) - k)[len(scores) - k]  # k-th best score
    above = np.flatnonzero(scores > kth)
    tied = np.flatnonzero(scores == kth)[: k - len(above)]  # lowest indices first
    chosen = np.concatenate([above, tied])
    return chosen[np.lexsort((chosen, -scores[chosen]))]  # last key sorts first


def search(index: BM25Index, queries: list[str], k: int) -> list[list[dict]]:
    """For each query, its top-k hits {"id", "title", "text", "score"} among
    the passages that share a word with it: fewer than k if fewer do, none
    for a query of unknown words (rather than k arbitrary passages)."""
    if isinstance(queries, str):
        raise TypeError("queries must be a list of strings, not one string")
    results = []
    for query in queries:
        scores = bm25_scores(index, query)
        candidates = matching_passages(index, query)  # ascending, so ties still go to lower indices
        best = candidates[top_k(scores[candidates], k)]
        results.append([{**index.docs[i], "score": float(scores[i])} for i in best])
    return results


def reference_scores(docs: list[dict], queries: list[str]) -> list[np.ndarray]:
    """The same scores from rank_bm25 itself (slow; for tests and --check)."""
    from rank_bm25 import BM25Okapi
    bm25 = BM25Okapi([passage_tokens(doc) for doc in docs])
    return [bm25.get_scores(tokenize(q)) for q in queries]


def format_hits(hits: list[dict], show_scores: bool = False) -> str:
    """Search-R1's rendering of one query's hits, one line each (the score
    in front only for humans: the model never sees it). "Doc 1(Title:" has
    no space, exactly as Search-R1 writes it, so a model trained there sees
    the same tokens here. No hits give ""."""
    def score(h):
        return f"[{h['score']:.3f}] " if show_scores and h["score"] is not None else ""
    return "\n".join(f"{score(h)}Doc {i}(Title: {h['title']}) {h['text']}"
                     for i, h in enumerate(hits, 1))


def local_searcher(corpus_path, show_progress: bool = True, *, max_chars: int = MAX_PASSAGE_CHARS):
    """Load a corpus, index it, and return searcher(queries, k). Texts are
    cut to max_chars in the hits only: BM25 still scores the whole passage."""
    cut = passage_cutter(max_chars)
    index = build_index(load_corpus(corpus_path), show_progress)
    return lambda queries, k: cut(search(index, queries, k))


# -------------------------------------------------------- remote server ---

class RetrievalError(RuntimeError):
    """The retrieval server failed (after retries) or answered something unusable."""


def post_once(url: str, body: bytes, timeout: float) -> tuple[int, bytes]:
    """One POST -> (HTTP status, the answer's bytes), the whole answer within `timeout` seconds. A socket's own
    timeout bounds each read only: a server that sends a byte every half second would never hit it. So a
    timer shuts the connection at the deadline, which ends whatever read is waiting (TimeoutError)."""
    deadline = time.monotonic() + timeout
    parts = urllib.parse.urlsplit(url)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = kind(parts.hostname, parts.port, timeout=timeout)
    expired = threading.Event()

    def expire(sock):
        expired.set()
        with contextlib.suppress(OSError):              # already closed: nothing waits on it
            sock.shutdown(socket.SHUT_RDWR)

    try:
        connection.connect()                            # bounded by the socket's timeout
        timer = threading.Timer(deadline - time.monotonic(), expire, args=(connection.sock,))
        timer.start()
        try:
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            connection.request("POST", path, body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            status, answer = response.status, response.read()
        except (OSError, http.client.HTTPException):
            if not expired.is_set():                    # not the deadline: the error itself is the problem
                raise
        finally:
            timer.cancel()
        if expired.is_set():                            # a shut connection can also read as a short answer
            raise TimeoutError(f"no whole answer within {timeout} s")
        return status, answer
    finally:
        connection.close()


def post_json(url: str, payload: dict, timeout: float, retries: int, backoff: float, parse):
    """POST JSON and return parse(the decoded answer). A failed attempt is retried after backoff, 2*backoff,
    4*backoff... seconds, each retry announced on stderr (else a hung server means minutes of silence). An
    attempt fails on no whole answer within `timeout` seconds, a connection error, HTTP 5xx, or an answer
    that is not JSON or that parse rejects with a ValueError (a server mid-restart may answer anything); HTTP
    4xx (our request is wrong) fails at once."""
    body = json.dumps(payload).encode()
    problem = None  # what went wrong in the previous attempt
    for attempt in range(max(retries, 0) + 1):
        if attempt:
            delay = backoff * 2 ** (attempt - 1)
            print(f"retrieval server {url}: {problem}; retry {attempt} of {retries} in {delay:g} s",
                  file=sys.stderr, flush=True)
            time.sleep(delay)
        try:
            status, answer = post_once(url, body, timeout)
        except TimeoutError:  # before OSError: TimeoutError is one
            problem = f"timeout (no answer within {timeout} s)"
            continue
        except (OSError, http.client.HTTPException) as e:
            problem = f"connection error: {e}"
            continue
        text = answer.decode("utf-8", errors="replace")
        if status >= 300:
            problem = f"HTTP {status}, body: {text[:300]!r}"
            if status < 500:
                raise RetrievalError(f"retrieval server {url} rejected the request: {problem}")
            continue
        try:
            return parse(json.loads(text))
        except json.JSONDecodeError:
            problem = f"answered non-JSON: {text[:300]!r}"
        except ValueError as e:
            problem = f"answered something unusable: {e}"
    raise RetrievalError(f"retrieval server {url} failed after {retries + 1} attempts; last error: {problem}")


def parse_server_hit(item) -> dict:
    """{"document": {"id", "contents"}, "score"} or, without scores, a bare {"id", "contents"} -> {"id", "title",
    "text", "score"}; id/score may be None. Anything else is a ValueError."""
    doc = item.get("document", item) if isinstance(item, dict) else None
    if not isinstance(doc, dict) or not isinstance(doc.get("contents"), str):
        raise ValueError(f"expected a hit like {{'document': {{'contents': ...}}, 'score': ...}}, "
                         f"got {str(item)[:300]!r}")
    title, text = split_contents(doc["contents"])
    score = item.get("score") if "document" in item else None
    if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
        raise ValueError(f"a hit's \"score\" must be a number, got {str(score)[:100]!r}")
    doc_id = str(doc["id"]) if doc.get("id") is not None else None
    return {"id": doc_id, "title": title, "text": text,
            "score": None if score is None else float(score)}


def check_url(url: str) -> None:
    """Refuse (ValueError) what cannot be a retrieval server's address, before any request."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError on a port that is not a number)
    except ValueError as e:
        raise ValueError(f"{url!r} is not a valid URL ({e})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// or https:// URL (e.g. http://host:8000/retrieve)")


def remote_searcher(url: str, timeout: float = 30, retries: int = 3, backoff: float = 1.0, *,
                    max_chars: int = MAX_PASSAGE_CHARS):
    """Return searcher(queries, k) that asks a Search-R1 retrieval server
    (`url` is the full endpoint, e.g. http://host:8000/retrieve) directly,
    without a proxy. All queries of one call travel in one request; the
    whole answer must arrive within `timeout` seconds; texts are cut to
    max_chars. A bad url or timeout is a ValueError at once."""
    check_url(url)
    if not 0 < timeout < math.inf:
        raise ValueError(f"timeout must be a positive, finite number of seconds, got {timeout}")
    cut = passage_cutter(max_chars)

    def searcher(queries: list[str], k: int) -> list[list[dict]]:
        if isinstance(queries, str):
            raise TypeError("queries must be a list of strings, not one string")

        def parse(answer):
            result = answer.get("result") if isinstance(answer, dict) else None
            if not isinstance(result, list) or len(result) != len(queries) \
                    or not all(isinstance(hits, list) for hits in result):
                raise ValueError(f"expected {{'result': [one list of hits per query]}} with {len(queries)} "
                                 f"lists, got {str(answer)[:300]!r}")
            return [[parse_server_hit(item) for item in hits] for hits in result]

        payload = {"queries": list(queries), "topk": k, "return_scores": True}
        return cut(post_json(url, payload, timeout, retries, backoff, parse))
    return searcher


# ------------------------------------------------------- retrieval server ---

MAX_TOPK = 100                 # Search-R1 asks for 3; a cap keeps one request from asking for the whole corpus
MAX_BODY_BYTES = 1_000_000     # thousands of queries: far above a turn's batch, far below a memory problem
MAX_DRAIN_BYTES = 64_000_000   # see RetrievalHandler.read_body
EXAMPLE_REQUEST = '{"queries": ["where was Treikar Komers born"], "topk": 3, "return_scores": true}'


def answer_request(index: BM25Index, body: bytes) -> tuple[int, dict]:
    """One POST /retrieve body -> (HTTP status, JSON answer), the whole protocol without sockets: Search-R1's
    {"queries": [str, ...], "topk": int, "return_scores": bool = false} -> {"result": one list per query of
    {"document": {"id", "contents"}, "score"}, or of bare {"id", "contents"} without scores}. Contents are
    FlashRAG's "Title\\ntext" again. A bad request is (400, {"error": what to fix})."""
    def refuse(problem):
        return 400, {"error": f"{problem}; send e.g. {EXAMPLE_REQUEST}"}

    try:
        request = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as e:
        return refuse(f"the body is not UTF-8 ({e})")
    except json.JSONDecodeError as e:
        return refuse(f"the body is not JSON ({e})")
    except RecursionError:  # e.g. a million "["
        return refuse("the body is JSON nested too deeply to read")
    if not isinstance(request, dict):
        return refuse(f"the body must be a JSON object, got {type(request).__name__}")
    queries = request.get("queries")
    if not isinstance(queries, list) or not all(isinstance(query, str) for query in queries):
        return refuse(f"\"queries\" must be a list of strings, got {json.dumps(queries)[:100]}")
    topk = request.get("topk")
    if not isinstance(topk, int) or isinstance(topk, bool) or not 1 <= topk <= MAX_TOPK:
        return refuse(f"\"topk\" must be an integer from 1 to {MAX_TOPK}, got {json.dumps(topk)[:100]}")
    with_scores = request.get("return_scores", False)
    if not isinstance(with_scores, bool):
        return refuse(f"\"return_scores\" must be true or false, got {json.dumps(with_scores)[:100]}")

    def as_sent(hit):
        document = {"id": hit["id"], "contents": f"{hit['title']}\n{hit['text']}"}
        return {"document": document, "score": hit["score"]} if with_scores else document
    return 200, {"result": [[as_sent(hit) for hit in hits] for hits in search(index, queries, topk)]}


class RetrievalHandler(http.server.BaseHTTPRequestHandler):
    """The HTTP around answer_request: method, path and body size, every answer JSON. It logs nothing: a
    line per request would bury the terminal under a training run's thousands."""
    timeout = 60  # seconds a silent client may hold its thread

    def do_POST(self):
        body = self.read_body()
        if body is None:
            return
        if urllib.parse.urlsplit(self.path).path != "/retrieve":
            return self.reply(404, {"error": f"no such path {self.path!r}; POST to /retrieve"})
        try:
            status, answer = answer_request(self.server.index, body)
        except Exception as e:  # our bug, not the request's: keep serving, say so, and let the client retry
            traceback.print_exc()
            status, answer = 500, {"error": f"the server failed: {e!r}"}
        self.reply(status, answer)

    def do_GET(self):  # a browser pointed at the server learns what it is
        if urllib.parse.urlsplit(self.path).path != "/":
            return self.not_post()
        self.reply(200, {"service": f"BM25 over {len(self.server.index.docs):,} passages, Search-R1's protocol",
                         "usage": f"POST /retrieve with {EXAMPLE_REQUEST}"})

    def not_post(self):
        if urllib.parse.urlsplit(self.path).path == "/retrieve":
            return self.reply(405, {"error": f"use POST for /retrieve, not {self.command}"}, Allow="POST")
        self.reply(404, {"error": f"no such path {self.path!r}; POST to /retrieve"})

    do_HEAD = do_GET
    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = not_post

    def read_body(self) -> bytes | None:
        """The request's body, or None once a 4xx has said why not. A body over the cap is read and dropped
        before the 413 (up to MAX_DRAIN_BYTES): closing a socket with unread data resets the connection, and
        the client, still sending, would see a connection error instead of the reason."""
        length = self.headers.get("Content-Length")
        if length is None:
            self.reply(411, {"error": "send a Content-Length header (chunked bodies are not supported)"})
            return None
        digits = length.strip()
        if not re.fullmatch(r"[0-9]+", digits):
            self.reply(400, {"error": f"Content-Length must be a number of bytes, got {length[:100]!r}"})
            return None
        size = int(digits) if len(digits) < 19 else MAX_DRAIN_BYTES + 1  # int() refuses 4,301 digits
        if size > MAX_BODY_BYTES:
            left = size if size <= MAX_DRAIN_BYTES else 0
            while left > 0 and (chunk := self.rfile.read(min(left, 65536))):
                left -= len(chunk)
            self.reply(413, {"error": f"the body is over the server's cap of {MAX_BODY_BYTES:,} bytes "
                                      f"(Content-Length: {digits[:30]}); send fewer queries per request"})
            return None
        return self.rfile.read(size)

    def reply(self, status: int, answer: dict, **headers) -> None:
        body = json.dumps(answer).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout): no one to answer
            self.close_connection = True

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (a malformed request line, an unknown method...) in JSON too."""
        self.close_connection = True
        self.reply(code, {"error": message or explain or http.HTTPStatus(code).phrase})

    def log_message(self, format, *args):
        pass


class RetrievalServer(http.server.ThreadingHTTPServer):
    """One thread per request, which all read the one index and never write it."""
    # Connections the kernel holds until we accept them. With the default 5, a burst of 64 ranks asking at once
    # loses some: a client waits a second for its connection to be retried, or is reset.
    request_queue_size = 128


def make_server(index: BM25Index, host: str = "127.0.0.1", port: int = 8000) -> RetrievalServer:
    """A server of `index` listening on host:port (port 0: a free one, in server.server_address), not serving
    yet: serve_forever() serves, shutdown() from another thread stops it."""
    server = RetrievalServer((host, port), RetrievalHandler)
    server.index = index
    return server


def serve_until_stopped(server: RetrievalServer, what: str) -> None:
    """Print "<what> at <URL>" on stdout, flushed (whoever started us may be waiting for it), then serve until
    Ctrl-C or SIGTERM, which end it quietly: a stop is how a server's run ends, not an error."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # raise KeyboardInterrupt, as Ctrl-C does
    host, port = server.server_address[:2]
    everywhere = " (all interfaces: other machines use this machine's address)" if host == "0.0.0.0" else ""
    try:
        print(f"{what} at http://{host}:{port}/retrieve{everywhere}", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def check(index: BM25Index, queries: list[str], k: int) -> None:
    """Compare our scores and top-k with rank_bm25 on the loaded corpus."""
    for query, ref in zip(queries, reference_scores(index.docs, queries)):
        fast = bm25_scores(index, query)
        same_top = list(top_k(fast, k)) == list(np.lexsort((np.arange(len(ref)), -ref))[:k])
        print(f"{query!r}: max |diff| {np.abs(fast - ref).max():.3g}, "
              f"bitwise equal {np.array_equal(fast, ref)}, same top-{k} {same_top}")


def positive_int(text: str) -> int:
    """argparse type for -k and --max-passage-chars (-k 0 would print no hits)."""
    value = int(text)  # a ValueError makes argparse say "invalid positive_int value"
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def port_number(text: str) -> int:
    """argparse type for --port: 0 (any free port) to 65535."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be from 0 to 65535, got {value}")
    return value


def main(argv: list[str] | None = None) -> None:
    """The command line; argv defaults to sys.argv[1:]. Bad input (flags, a
    missing or broken corpus, a failing server) ends it with one line on
    stderr, not a traceback."""
    parser = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__.split("\n")[0])
    parser.add_argument("queries", nargs="*", help="queries to search for")
    parser.add_argument("--corpus", default=str(Path(__file__).parent / "data" / "corpus.jsonl"),
                        help="FlashRAG corpus JSONL")
    parser.add_argument("--url", help="query a Search-R1 server (e.g. http://host:8000/retrieve)")
    parser.add_argument("-k", type=positive_int, default=3, help="hits per query")
    parser.add_argument("--max-passage-chars", type=positive_int, default=MAX_PASSAGE_CHARS,
                        help="cut longer passage texts to this many characters (and say so)")
    parser.add_argument("--check", action="store_true", help="compare scores with rank_bm25")
    parser.add_argument("--serve", action="store_true",
                        help="serve the corpus's BM25 index over HTTP (Search-R1's POST /retrieve) until Ctrl-C")
    parser.add_argument("--host", default="127.0.0.1",
                        help="--serve's address: 127.0.0.1 for this machine only, 0.0.0.0 for the network")
    parser.add_argument("--port", type=port_number, default=8000, help="--serve's port (0: any free one)")
    args = parser.parse_args(argv)
    if args.serve and (args.queries or args.url or args.check):
        parser.error("--serve takes no queries, --url or --check")
    if not (args.queries or args.check or args.serve):
        parser.error("give at least one query, --check or --serve")
    if args.url:
        try:
            searcher = remote_searcher(args.url, max_chars=args.max_passage_chars)
        except ValueError as e:  # not a URL
            parser.exit(1, f"{parser.prog}: --url: {e}\n")
        try:
            results = searcher(args.queries, args.k)
        except RetrievalError as e:
            parser.exit(1, f"{parser.prog}: {e}\n")
    else:
        try:
            docs = load_corpus(args.corpus)
        except (OSError, ValueError) as e:  # missing file, bad line "path:line: ..."
            parser.exit(1, f"{parser.prog}: {e} (--corpus)\n")
        index = build_index(docs)
        if args.serve:
            try:
                server = make_server(index, args.host, args.port)
            except OSError as e:  # port taken, unknown host
                parser.exit(1, f"{parser.prog}: cannot listen on {args.host}:{args.port}: {e} (--host, --port)\n")
            return serve_until_stopped(server, f"serving {args.corpus} ({len(index.docs):,} passages)")
        if args.check:
            sample = [f"{d['title']} {d['text']}"[:60] for d in index.docs[:5]]
            return check(index, args.queries or sample, args.k)
        results = passage_cutter(args.max_passage_chars)(search(index, args.queries, args.k))
    for query, hits in zip(args.queries, results):
        print(f"\n== {query}\n{format_hits(hits, show_scores=True)}")


if __name__ == "__main__":
    main()
