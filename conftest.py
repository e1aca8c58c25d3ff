"""What the test files share: the slow marker, the tiny model's configuration, the session's fixtures (the search
engine, a random tiny model, the learning run) and helpers for whole runs."""
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # a hub id would hang ~50 s before failing offline

import pytest
import torch

import data.make_world as make_world
import data.warm_start as warm
import memsearcher as ms
import runs
from retriever import local_searcher

ROOT = Path(__file__).parent


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: the learning test and whole command-line runs; the fast tier is "
                                       "python -m pytest -m \"not slow\"")


def tiny_config(tmp, **overrides):
    base = {**ms.PRESETS["tiny"], "output_dir": str(tmp), "warm_start_dir": str(Path(tmp) / "warm-start")}
    return ms.Config(**{**base, **overrides})


def train(cfg):
    """What `python memsearcher.py` does with a Config: the tiny model's warm start, then GRPO."""
    return ms.train_and_evaluate(cfg, warm.warm_started(cfg))


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
                      corpus=str(out / "corpus.jsonl"), pretrain_steps=200, warm_steps=600, steps=15, lr=3e-4,
                      questions_per_step=8, max_turns=4, eval_max_turns=4, eval_n=0, eval_every=0, print_every=0,
                      seed=0)
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
