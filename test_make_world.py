"""Tests for data/make_world.py: the toy world is reproducible, and every question can be answered by walking
its chain of supporting passages with BM25.

    python -m pytest -q test_make_world.py
"""
import json

import data.make_world as make_world
import memsearcher as ms
import retriever as r
from conftest import ROOT


def test_world_generator_is_deterministic_and_matches_committed_files(tmp_path):
    make_world.main(tmp_path)
    for name in ["corpus.jsonl", "train.jsonl", "test.jsonl"]:
        assert (tmp_path / name).read_bytes() == (ROOT / "data" / name).read_bytes(), name


def test_world_questions_are_answerable_and_reachable_by_bm25(searcher):
    corpus = {json.loads(line)["id"]: json.loads(line)["contents"] for line in open(ROOT / "data" / "corpus.jsonl")}
    train, test = r.load_questions(ROOT / "data" / "train.jsonl"), r.load_questions(ROOT / "data" / "test.jsonl")
    assert len(train) >= 2000 and len(test) >= 300
    assert not {q["question"] for q in train} & {q["question"] for q in test}
    assert {q["type"] for q in test} == {"1-hop", "2-hop bridge", "3-hop bridge", "comparison"}
    hops = [h for q in train + test for h in q["support"]]
    top_k = ms.PRESETS["tiny"]["top_k"]
    hits = searcher([h["query"] for h in hops], top_k)
    for h, found in zip(hops, hits):
        assert h["fact"] in corpus[h["doc_id"]]                         # the fact is in its passage
        assert h["doc_id"] in [x["id"] for x in found], h["query"]      # and its query finds it (top 2)
    for q in train + test:                                              # the chain ends at the answer
        if q["type"] != "comparison":
            assert q["support"][-1]["finding"] == q["golden_answers"][0]
            assert q["golden_answers"][0] in q["support"][-1]["fact"]
