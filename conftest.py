"""What the test files share: the slow marker, the tiny model's configuration, the session's fixtures (the search
engine, a random tiny model, Qwen's tokenizer, the learning run) and helpers for whole runs."""
import http.server
import json
import os
import random
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # a hub id would hang ~50 s before failing offline

import pytest
import torch

import data.make_world as make_world
import data.warm_start as warm
import memsearcher as ms
import retriever
import runs
import settings
from retriever import local_searcher

ROOT = Path(__file__).parent


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: the learning test and whole command-line runs; the fast tier is "
                                       "python -m pytest -m \"not slow\"")


def pytest_addoption(parser):
    parser.addoption("--order", default="file", help="the order tests run in: file (as written), reverse, or a "
                     "number N (shuffled with seed N). Any order passes: no test relies on what another left behind")


def pytest_collection_modifyitems(config, items):
    order = config.getoption("--order")
    if order == "reverse":
        items.reverse()
    elif order != "file":
        random.Random(int(order)).shuffle(items)


def tiny_config(tmp, **overrides):
    base = {**ms.PRESETS["tiny"], "output_dir": str(tmp), "warm_start_dir": str(Path(tmp) / "warm-start")}
    return ms.Config(**{**base, **overrides})


def parse_args(argv):
    """The command line of memsearcher.py -> its Config, checked."""
    return settings.parse_args(argv, ms.Config, ms.PRESETS)


def train(cfg):
    """What `python memsearcher.py` does with a Config: the tiny model's warm start, then GRPO."""
    return ms.grpo_run(cfg, warm.warm_started(cfg))


def quick_config(out, **overrides):
    """A random tiny model, no warm start, 2-question steps: a whole run in a few seconds."""
    settings = dict(pretrain_steps=0, warm_steps=0, steps=2, group_size=2, questions_per_step=2, eval_n=2,
                    max_new_tokens=8, max_turns=2, eval_max_turns=2, eval_every=0, print_every=0,
                    warm_start_dir=str(Path(out).parent / "warm"))
    return tiny_config(out, **{**settings, **overrides})


@pytest.fixture(scope="session")
def searcher():
    return local_searcher(ms.Config().corpus, show_progress=False)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A random tiny Qwen2 on disk, loaded through the Auto classes: (cfg, model, tokenizer)."""
    cfg = tiny_config(tmp_path_factory.mktemp("tiny"))
    path = warm.build_tiny_model(cfg, warm.tiny_tokenizer_texts(cfg), Path(cfg.output_dir) / "tiny-init")
    model, tokenizer = ms.load_policy(path, torch.device("cpu"))
    return cfg, model, tokenizer


def tiny_llama(vocab_size, **special_ids):
    """A random Llama of SmolLM2's make (tied embeddings, 2 key/value heads for 4 query heads), at a tiny size."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=4096, rope_theta=1e5, rms_norm_eps=1e-5,
                                        tie_word_embeddings=True, **special_ids))


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
    """Qwen2.5-Instruct's real tokenizer, built offline from its BPE ranks (a few seconds: built once)."""
    from data.qwen_tokenizer import qwen25_tokenizer
    return qwen25_tokenizer(tmp_path_factory.mktemp("qwen25-tokenizer"))


# A small toy world for the learning test: 2-hop bridge questions only, where keeping the first hop's fact in
# memory decides whether the agent can finish ("In which country was X born?": X's bio, then the city).
MINI_WORLD = dict(N_COUNTRIES=6, N_CITIES=20, N_PEOPLE=200, N_NOVELS=150, N_TRAIN=300, N_TEST=60,
                  TYPE_SHARES={"2-hop bridge": 1.0})


@pytest.fixture(scope="session")
def learned(tmp_path_factory):
    """The whole --tiny pipeline, shortened, on the small world: pretraining, imitation of the imperfect
    expert, greedy evaluation, 15 GRPO steps, evaluation. -> (cfg, eval before GRPO, eval after GRPO)."""
    out = tmp_path_factory.mktemp("learn")
    saved = {k: getattr(make_world, k) for k in MINI_WORLD}
    try:
        for k, v in MINI_WORLD.items():
            setattr(make_world, k, v)
        make_world.main(out)
    finally:
        for k, v in saved.items():
            setattr(make_world, k, v)
    cfg = tiny_config(out, train_file=[str(out / "train.jsonl")], test_file=[str(out / "test.jsonl")],
                      corpus=str(out / "corpus.jsonl"), pretrain_steps=200, warm_steps=600, warm_batch=4, steps=15,
                      lr=3e-4, questions_per_step=8, max_turns=4, eval_max_turns=4, eval_n=0, eval_every=0,
                      print_every=0, seed=0)
    train(cfg)
    evals = [json.loads(line)["eval"] for line in open(out / "metrics.jsonl") if '"eval"' in line]
    return cfg, evals[0], evals[-1]


@pytest.fixture(scope="session")
def formatted(learned):
    """The tiny model after the learning run: it writes the format and takes several turns."""
    cfg, _, _ = learned
    model, tokenizer = ms.load_policy(str(runs.latest_checkpoint(cfg.output_dir)), torch.device("cpu"))
    return cfg, model, tokenizer, local_searcher(cfg.corpus, show_progress=False)


def parity_reward(t, reward="em"):
    """A stand-in reward for runs of an untrained model, whose exact match is always 0: 1 when the sampled ids of
    the trajectory add up to an even number. Groups get mixed rewards, so GRPO really updates the weights."""
    return float(sum(i for c in t["convs"] for i, m in zip(c["ids"], c["mask"]) if m) % 2 == 0)


def weights(path):
    model, _ = ms.load_policy(str(path), torch.device("cpu"))
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def run_cli(script, *args):
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)


# Retrieval servers for the tests: retriever.py's own, and a fake one that answers whatever a test plans.

@pytest.fixture(scope="session")
def bm25_server():
    """retriever.py's own server over data/corpus.jsonl, in a thread: (its URL, its port)."""
    index = retriever.build_index(retriever.load_corpus(ms.Config().corpus), show_progress=False)
    server = retriever.make_server(index, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/retrieve", server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


class Handler(http.server.BaseHTTPRequestHandler):
    """Answers POSTs with whatever server.plan(request, n) returns:
    (status, JSON-able answer or raw bytes, seconds to sleep first), and
    optionally seconds to wait between bytes: the whole answer, status line
    first, then trickles out a byte at a time."""

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(request)
        status, answer, delay, *trickle = self.server.plan(request, len(self.server.requests))
        time.sleep(delay)
        body = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
        if trickle:
            raw = f"HTTP/1.0 {status} OK\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
            for i in range(len(raw)):  # ends when the client hangs up (a write error) or the answer is out
                self.wfile.write(raw[i:i + 1])
                time.sleep(trickle[0])
            return
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@contextmanager
def serve(plan):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.block_on_close = False               # don't wait for sleeping handlers
    server.handle_error = lambda *args: None    # client hung up on a slow handler
    server.requests, server.plan = [], plan
    threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()  # fast shutdown
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/retrieve", server
    finally:
        server.shutdown()
        server.server_close()


def search_r1_answer(request):
    return {"result": [[{"document": {"id": f"{q}-{j}", "contents": f"Title {q}\ntext {j}"},
                         "score": 10.0 - j} for j in range(request["topk"])]
                       for q in request["queries"]]}
