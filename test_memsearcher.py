"""Tests for memsearcher.py, in its order, offline on the CPU with a tiny Qwen2 built from data/. Each other module
has its own test file (test_retriever.py, test_runs.py, test_warm_start.py, test_make_world.py,
test_qwen_tokenizer.py for what --small depends on, test_docs.py); conftest.py holds what they share.

    HF_HUB_OFFLINE=1 python -m pytest -q
"""
import codecs
import copy
import itertools
import json
import math
import os
import random
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path


import pytest
import torch
from transformers import GenerationConfig

import data.warm_start as warm
import memsearcher as ms
import retriever as r
import runs
from data.qwen_tokenizer import qwen25_05b_shaped
from conftest import (ROOT, parity_reward, parse_args, quick_config, search_r1_answer, serve, tiny_config, train,
                      weights)


# ----------------------------------------------------------------------------------------------------- prompt ---

def test_prompt_holds_question_and_memory_only(tiny):
    _, _, tokenizer = tiny
    ids = ms.render_prompt(tokenizer, "Where was Ilvo Marsk born?", "Ilvo Marsk was born in Tarvel.")
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\n" + ms.SYSTEM_PROMPT + "<|im_end|>")
    assert "<question> Where was Ilvo Marsk born? </question>" in text
    assert "<memory> Ilvo Marsk was born in Tarvel. </memory>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert tokenizer(text, add_special_tokens=False).input_ids == ids      # nothing lost in rendering


def test_each_turn_starts_from_the_question_and_its_memory_alone(tiny, searcher):
    trajs, tokenizer = scripted_rollout(tiny, searcher, "memsearcher", searches=3)
    for t in trajs:
        assert len(t["convs"]) == len(t["turns"]) == 4
        for i, (conv, turn) in enumerate(zip(t["convs"], t["turns"])):
            prompt = ms.render_prompt(tokenizer, t["question"]["question"], turn["memory_before"])
            assert conv["ids"][:len(prompt)] == prompt and conv["mask"][:len(prompt) + 1] == [0] * len(prompt) + [1]
            assert turn["memory_before"] == (t["turns"][i - 1]["memory"] if i else "")


def test_information_is_cut_to_its_token_budget_and_the_first_cut_reported(tiny, searcher, monkeypatch, capsys):
    cfg, model, tokenizer = tiny
    monkeypatch.setattr(ms, "information_cut_reported", False)
    questions = r.load_questions(cfg.test_file[0])[:4]
    small = tiny_config(cfg.output_dir, top_k=5, max_information_tokens=50)
    trajs = ms.rollout(model, tokenizer, searcher, questions, small, greedy=True, max_turns=3,
                       generate_fn=warm.scripted_policy(questions, 2))
    end = tokenizer("\n</information>\n", add_special_tokens=False).input_ids
    for conv in [c for t in trajs for c in t["convs"][:2]]:               # each of these turns searched
        runs_of_mask = [list(g) for _, g in itertools.groupby(zip(conv["ids"], conv["mask"]), key=lambda x: x[1])]
        user_turn = [i for i, _ in runs_of_mask[2]]                      # prompt, action, then the user turn
        user_open = ms.turn_markers(tokenizer)[1]
        information = user_turn[len(user_open):len(user_open) + 50]
        assert user_turn[:len(user_open)] == user_open and information[-len(end):] == end
        assert tokenizer.decode(information).startswith("<information>")
        assert tokenizer.decode(user_turn[len(user_open) + 50:]).startswith(ms.MEMORY_INSTRUCTION)
    assert capsys.readouterr().err.count("cut to 50 (--max-information-tokens)") == 1
    hits = searcher(["Ilvo Marsk"], 2)[0]                                # under the budget: as it always was
    assert ms.information_ids(tokenizer, hits, 500) == \
        tokenizer(ms.information_text(hits), add_special_tokens=False).input_ids


# ---------------------------------------------------------------------------------------------------- parsing ---

@pytest.mark.parametrize("text, expected", [
    ("<think> need facts </think>\n<search> Ilvo Marsk born </search>", ("search", "Ilvo Marsk born")),
    ("<think> I know it </think>\n<answer> Tarvel </answer>", ("answer", "Tarvel")),
    ("<answer>Tarvel</answer>", ("answer", "Tarvel")),                             # think is optional
    ("\n<think>\nx\n</think>\n\n<answer>\n  Osmaria \n</answer>", ("answer", "Osmaria")),
    ("Sure. <think> x </think> Let me look. <search> q </search>", ("search", "q")),    # free text ignored
    ("<search> q </search>\n", ("search", "q")),                # text before the end of turn is ignored
    ("<answer> b </answer> That is all.", ("answer", "b")),
    ("<search>a</search><answer>b</answer>", ("malformed", "unexpected <answer> after </search>")),  # one action
    ("<answer>b</answer><search>a</search>", ("malformed", "unexpected <search> after </answer>")),
    ("<search> a </search><think> b </think>", ("malformed", "unexpected <think> after </search>")),
    ("<answer> a < b </answer>", ("answer", "a < b")),          # '<' that is not a tag is text
    ("<answer> Zoë Ångström </answer>", ("answer", "Zoë Ångström")),
    ("<think> no action </think>", ("malformed", "no </search> or </answer>")),
    ("", ("malformed", "no </search> or </answer>")),
    ("<think> unclosed <search> q </search>", ("malformed", "unclosed <think>")),
    ("<think> maybe <search> q </search> </think>", ("malformed", "unclosed <think>")),  # search in think
    ("<think> the </answer> tag </think><answer> x </answer>", ("malformed", "</answer> without <answer>")),
    ("<search>   </search>", ("malformed", "empty <search>")),
    ("<think> x </think><answer>\n</answer>", ("answer", "")),          # well formed, as the official \\boxed{}
    ("q </search>", ("malformed", "</search> without <search>")),
    ("<search> a <answer> b </answer>", ("malformed", "unexpected <search> before <answer>")),
    ("<memory> x </memory><answer> y </answer>", ("malformed", "unexpected <memory> before <answer>")),
    ("<information> x </information><answer> y </answer>",
     ("malformed", "unexpected <information> before <answer>")),
    ("<think> a </think><think> b </think><answer> c </answer>",
     ("malformed", "unexpected <think> before <answer>")),
    ("<SEARCH> q </SEARCH>", ("malformed", "no </search> or </answer>")),       # tags are case-sensitive
    ("<search> q <think> x </think> </search>", ("malformed", "tag inside <search>")),
])
def test_parse_action(text, expected):
    assert ms.parse_action(text) == expected


@pytest.mark.parametrize("text, memory, reason", [
    ("<memory> Ilvo Marsk was born in Tarvel. </memory>", "Ilvo Marsk was born in Tarvel.", None),
    ("<think> keep the city </think><memory> Tarvel </memory>", "Tarvel", None),
    ("<memory> </memory>", None, "empty_memory"),                       # as the official code: it ends there
    ("Ilvo Marsk was born in Tarvel.", None, "malformed_memory"),          # no tags
    ("<memory> Ilvo Marsk was born", None, "malformed_memory"),           # unclosed (truncated)
    ("<memory> x <search> y </search> </memory>", None, "malformed_memory"),
    ("<memory> x </memory><memory> y </memory>", None, "malformed_memory"),       # one memory, not two
    ("<memory> " + "fact " * 200 + "</memory>", None, "memory_over_limit"),  # huge memory
])
def test_parse_memory(tiny, text, memory, reason):
    _, _, tokenizer = tiny
    assert ms.parse_memory(text, tokenizer, max_memory_tokens=96) == (memory, reason)


# ---------------------------------------------------------------------------------------------------- rollout ---

def char_ids(tokenizer, text):
    """Token ids of `text`, one character at a time: decodes to `text` but is not how the tokenizer encodes it,
    like a sampled sequence that the tokenizer would have merged differently."""
    return [i for ch in text for i in tokenizer(ch, add_special_tokens=False).input_ids]


def script(tokenizer, plays):
    """A generate_fn that plays fixed outputs per question (in order: action, memory, action, ...), returning
    each as character ids, so the rollout must keep sampled ids exactly as they come. A play is a text that the
    model ends with its end of turn, or (text, end): ended by the token `end` instead, or cut by the token limit
    (None)."""
    calls = Counter()

    def generate_fn(model, tokenizer, contexts, max_new_tokens, greedy, temperature=1.0):
        outs = []
        for context in contexts:
            question = re.findall(r"<question> (.*?) </question>", tokenizer.decode(context), flags=re.S)[-1]
            play = plays[question][calls[question]]
            text, end = play if isinstance(play, tuple) else (play, "<|im_end|>")
            calls[question] += 1
            ends = [tokenizer.convert_tokens_to_ids(end)] if end else []
            outs.append((char_ids(tokenizer, text) + ends, text, bool(end)))
        return outs
    return generate_fn


PLAYS = {"Where was Ilvo Marsk born?": ["<think> a </think><search> Ilvo Marsk </search>",
                                        "<memory> Ilvo Marsk was born in Tarvel. </memory>",
                                        "<answer> Tarvel </answer>"],
         "In which country is Tarvel?": ["<search> Tarvel </search>", "<memory> Tarvel is a city. </memory>",
                                         "<search> Tarvel country </search>",
                                         "<memory> Tarvel is in Osmaria. </memory>",
                                         "<answer> Osmaria </answer>"]}


def user_turn(tokenizer, hits, instruction):
    """The user message after a search and the opening of the model's next turn, ChatML written out by hand."""
    text = (f"\n<|im_start|>user\n{ms.information_text(hits)}{ms.MEMORY_INSTRUCTION if instruction else ''}"
            "<|im_end|>\n<|im_start|>assistant\n")
    return tokenizer(text, add_special_tokens=False).input_ids


def test_rollout_keeps_sampled_ids_and_masks_exactly(tiny, searcher):
    """MemSearcher: per turn, a fresh conversation = prompt(question, memory) 0 | action, end of turn 1 |
    user(passages, instruction) 0 | memory, end of turn 1. ReAct: one conversation = prompt 0 | action 1 |
    user(passages) 0 | action 1 | ... The end of turn is sampled, so trained."""
    cfg, model, tokenizer = tiny
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    questions = [{"id": str(i), "question": q, "golden_answers": [plays[-1].split()[1]]}
                 for i, (q, plays) in enumerate(PLAYS.items())]
    assert char_ids(tokenizer, PLAYS[questions[0]["question"]][1]) != \
        tokenizer(PLAYS[questions[0]["question"]][1], add_special_tokens=False).input_ids
    out = lambda text: char_ids(tokenizer, text) + [eos]                                                 # noqa: E731
    for workflow in ms.WORKFLOWS:
        plays_of = PLAYS if workflow == "memsearcher" else {q: plays[0::2] for q, plays in PLAYS.items()}
        trajs = ms.rollout(model, tokenizer, searcher, questions, cfg, max_turns=5, workflow=workflow,
                           generate_fn=script(tokenizer, plays_of))
        for q, t in zip(questions, trajs):
            plays = plays_of[q["question"]]
            assert (t["stop"], t["answer"]) == ("answered", plays[-1].split()[1])
            if workflow == "memsearcher":
                memory, actions, memories = "", plays[0::2], plays[1::2]
                assert len(t["convs"]) == len(actions)
                for i, (conv, turn) in enumerate(zip(t["convs"], t["turns"])):
                    prompt = ms.render_prompt(tokenizer, q["question"], memory)     # the memory is carried over
                    parts = [(prompt, 0), (out(actions[i]), 1)]
                    if i < len(memories):
                        parts += [(user_turn(tokenizer, turn["hits"], True), 0), (out(memories[i]), 1)]
                        memory = memories[i].split("<memory> ")[1].split(" </memory>")[0]
                    assert conv["ids"] == [x for ids, _ in parts for x in ids]
                    assert conv["mask"] == [m for ids, m in parts for _ in ids]
            else:
                prompt = ms.render_prompt(tokenizer, q["question"], None, "react")
                parts = [(prompt, 0)]
                for i, turn in enumerate(t["turns"]):
                    parts += [(out(plays[i]), 1)] + ([(user_turn(tokenizer, turn["hits"], False), 0)]
                                                     if "hits" in turn else [])
                assert [c["ids"] for c in t["convs"]] == [[x for ids, _ in parts for x in ids]]
                assert [c["mask"] for c in t["convs"]] == [[m for ids, m in parts for _ in ids]]


SEARCH = "<think> I need the town </think><search> Ilvo Marsk </search>"
MEMORY = "<memory> Ilvo Marsk was born in Tarvel. </memory>"
STOP_PLAYS = [   # (the stop, what the model writes: action, memory, action, ...) in 3 turns
    ("answered", [SEARCH, MEMORY, "<think> I know it </think><answer> Tarvel </answer>"]),
    ("malformed_action", ["<think> no action </think>"]),
    ("malformed_action", [("<answer> Tarvel </answer>", "<|endoftext|>")]),  # an answer's turn ended otherwise
    ("malformed_memory", [SEARCH, "Tarvel, without tags"]),
    ("empty_memory", [SEARCH, "<memory> </memory>"]),
    ("action_truncated", [("<answer> Tarvel </answer>", None)]),   # a whole answer, cut: it does not count
    ("memory_truncated", [SEARCH, (MEMORY, None)]),
    ("memory_over_limit", [SEARCH, "<memory> " + "Tarvel " * 200 + "</memory>"]),
    ("max_turns", [SEARCH, MEMORY] * 3),                           # the last turn's search is read too
]


def test_every_stop_reason_is_reached_by_a_scripted_rollout(tiny, searcher):
    cfg, model, tokenizer = tiny
    plays = {f"Where was Ilvo Marsk born (play {i})?": play for i, (_, play) in enumerate(STOP_PLAYS)}
    questions = [{"id": str(i), "question": q, "golden_answers": ["Tarvel"]} for i, q in enumerate(plays)]
    trajs = ms.rollout(model, tokenizer, searcher, questions, cfg, max_turns=3, generate_fn=script(tokenizer, plays))
    assert [t["stop"] for t in trajs] == [stop for stop, _ in STOP_PLAYS]
    for t, (stop, play) in zip(trajs, STOP_PLAYS):
        assert (t["answer"] is not None) == (stop == "answered")
        assert len(t["turns"]) == (len(play) + 1) // 2              # every play was written, and nothing more
        assert t["convs"][-1]["mask"][-1] == 1                      # each ends on what the model wrote
    assert trajs[0]["answer"] == "Tarvel" and trajs[-1]["memory"] == "Ilvo Marsk was born in Tarvel."
    assert set(ms.STOP_REASONS) - {stop for stop, _ in STOP_PLAYS} == {"context_over_limit"}   # next test


def test_a_context_that_would_pass_the_models_positions_stops_before_generate(tiny, searcher):
    cfg, model, tokenizer = tiny
    limit = model.config.max_position_embeddings
    question = "Where was " + "Ilvo Marsk " * 600 + "born?"
    prompt = len(ms.render_prompt(tokenizer, question, ""))
    plays = {question: [SEARCH, MEMORY], question + " Tarvel": [SEARCH]}      # the second is 2 tokens longer
    questions = [{"id": str(i), "question": q, "golden_answers": ["Tarvel"]} for i, q in enumerate(plays)]
    room = tiny_config(cfg.output_dir, max_new_tokens=limit - prompt)   # the first question's action just fits
    calls, play = [], script(tokenizer, plays)

    def recording(model, tokenizer, contexts, max_new_tokens, greedy, temperature=1.0):
        calls.append([len(c) + max_new_tokens for c in contexts])
        return play(model, tokenizer, contexts, max_new_tokens, greedy, temperature)

    first, second = ms.rollout(model, tokenizer, searcher, questions, room, generate_fn=recording)
    assert [c for c in calls if c] == [[limit]]                # no call past the limit: the memory's would be
    assert (first["stop"], "hits" in first["turns"][0], second["stop"]) == \
        ("context_over_limit", True, "context_over_limit")
    assert second["context_tokens"] == [] and len(first["context_tokens"]) == 1


@pytest.mark.slow
def test_rollout_masks_cover_exactly_the_sampled_tokens(formatted):
    cfg, model, tokenizer, searcher = formatted
    sampled = []                                             # every id list generate() hands back

    def spy(*args, **kwargs):
        out = ms.generate(*args, **kwargs)
        sampled.extend(ids for ids, _, _ in out)
        return out

    questions = r.load_questions(cfg.test_file[0])[:12]
    trajs = ms.rollout(model, tokenizer, searcher, questions, cfg, generate_fn=spy)
    assert sampled
    assert any(len(t["convs"]) >= 2 for t in trajs), "want multi-turn trajectories to check"
    pieces, trained = [tuple(ids) for ids in sampled], []
    for t in trajs:
        memory = ""
        for conv, turn in zip(t["convs"], t["turns"]):
            ids, mask = conv["ids"], conv["mask"]
            assert len(ids) == len(mask)
            # the conversation starts from question + memory only (nothing from earlier turns)
            prompt = ms.render_prompt(tokenizer, t["question"]["question"], memory)
            assert ids[:len(prompt)] == prompt and not any(mask[:len(prompt)])
            # mask = 1 runs are exactly sampled outputs; mask = 0 after the prompt is the retrieved passages
            runs, i = [], len(prompt)
            while i < len(ids):
                j = i
                while j < len(ids) and mask[j] == mask[i]:
                    j += 1
                runs.append((mask[i], ids[i:j]))
                i = j
            trained += [tuple(r) for m, r in runs if m]
            injected = [r for m, r in runs if not m]
            if "hits" in turn:
                assert injected == [user_turn(tokenizer, turn["hits"], True)]
            else:
                assert injected == []
            memory = turn.get("memory", memory)
        assert t["stop"] in ms.STOP_REASONS
    assert Counter(trained) == Counter(pieces)      # every sampled output trained, once; nothing else trained


@pytest.mark.slow
def test_rollout_counts_every_stop_reason(formatted):
    cfg, model, tokenizer, searcher = formatted
    questions = r.load_questions(cfg.test_file[0])[:16]
    short = tiny_config(cfg.output_dir, max_turns=2, max_new_tokens=12)
    trajs = ms.rollout(model, tokenizer, searcher, questions, short)
    for t in trajs:
        t["reward"] = ms.trajectory_reward(t)
    stops = ms.summarize(trajs)["stops"]
    assert sum(stops.values()) == len(questions)
    assert "action_truncated" in stops or "memory_truncated" in stops    # 12 tokens cannot hold the format
    for t in trajs:
        assert len(t["turns"]) <= 2
        assert (t["answer"] is not None) == (t["stop"] == "answered")


def test_retriever_url_serves_the_rollout_one_request_per_turn(tiny, searcher, bm25_server, monkeypatch):
    """--retriever-url: the Search-R1 server API, one request per turn with searches, against retriever.py's own
    server: the same passages as the in-process index, so the same conversations, token for token."""
    cfg, model, tokenizer = tiny
    url, _ = bm25_server
    requests, real_post = [], r.post_json
    monkeypatch.setattr(r, "post_json", lambda url, payload, *args: requests.append(payload) or real_post(url, payload,
                                                                                                        *args))
    remote_cfg = tiny_config(cfg.output_dir, retriever_url=url, eval_n=6)
    _, questions, search = ms.load_data(remote_cfg)
    trajs = ms.rollout(model, tokenizer, search, questions, remote_cfg, greedy=True, max_turns=4,
                       generate_fn=warm.scripted_policy(questions, 3))
    assert len(requests) == 3                                            # one request per turn with searches
    assert all(len(req["queries"]) == 6 and req["topk"] == remote_cfg.top_k for req in requests)
    local = ms.rollout(model, tokenizer, searcher, questions, remote_cfg, greedy=True, max_turns=4,
                       generate_fn=warm.scripted_policy(questions, 3))
    assert [t["convs"] for t in trajs] == [t["convs"] for t in local]     # same passages, same token ids


# --------------------------------------------------------------------------------------- MemSearcher vs ReAct ---

def scripted_rollout(tiny, searcher, workflow, searches, n=12, turns=8):
    cfg, model, tokenizer = tiny
    questions = r.load_questions(cfg.test_file[0])[:n]
    policy = warm.scripted_policy(questions, searches)
    return ms.rollout(model, tokenizer, searcher, questions, tiny_config(cfg.output_dir), greedy=True,
                      max_turns=turns, workflow=workflow, generate_fn=policy), tokenizer


def test_react_keeps_one_conversation_and_masks_the_passages(tiny, searcher):
    trajs, tokenizer = scripted_rollout(tiny, searcher, "react", searches=3)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for t in trajs:
        assert len(t["convs"]) == 1 and len(t["turns"]) == 4 and t["stop"] == "answered"
        conv = t["convs"][0]
        prompt = ms.render_prompt(tokenizer, t["question"]["question"], None, "react")
        expected_ids, expected_mask = list(prompt), [0] * len(prompt)
        for turn in t["turns"]:
            action = tokenizer(turn["action"], add_special_tokens=False).input_ids + [end_of_turn]
            expected_ids += action
            expected_mask += [1] * len(action)
            if "hits" in turn:
                info = user_turn(tokenizer, turn["hits"], False)
                expected_ids += info
                expected_mask += [0] * len(info)                 # the user turn with the passages: never trained
            assert "memory_output" not in turn                   # ReAct writes no memory
        assert conv["ids"] == expected_ids and conv["mask"] == expected_mask
        assert t["context_tokens"] == sorted(set(t["context_tokens"]))       # grows every turn


def test_workflows_agree_on_one_turn_answers(tiny, searcher):
    results = {w: scripted_rollout(tiny, searcher, w, searches=0)[0] for w in ms.WORKFLOWS}
    for a, b in zip(results["memsearcher"], results["react"]):
        assert a["stop"] == b["stop"] == "answered"
        assert (a["answer"], len(a["turns"])) == (b["answer"], len(b["turns"]))
        sampled = [[i for i, m in zip(c["ids"], c["mask"]) if m] for t in (a, b) for c in t["convs"]]
        assert sampled[0] == sampled[1]


def test_context_per_turn_is_what_each_generate_call_attended_over(tiny, searcher):
    """A turn's context is its longest generate call's: the ids it was given plus the ids it wrote. ReAct reads a
    turn's passages only in the next turn, so they count there."""
    cfg, model, tokenizer = tiny
    questions = r.load_questions(cfg.test_file[0])[:6]
    for workflow in ms.WORKFLOWS:
        policy, calls = warm.scripted_policy(questions, searches=3), []

        def recording(model, tokenizer, contexts, *args):
            outs = policy(model, tokenizer, contexts, *args)
            calls.extend((tokenizer.decode(c), len(c) + len(ids)) for c, (ids, _, _) in zip(contexts, outs))
            return outs

        trajs = ms.rollout(model, tokenizer, searcher, questions, tiny_config(cfg.output_dir), greedy=True,
                           max_turns=5, workflow=workflow, generate_fn=recording)
        for t in trajs:
            expected = []
            for text, length in calls:
                if f"<question> {t['question']['question']} </question>" in text:
                    if ms.MEMORY_INSTRUCTION not in text:
                        expected.append(length)              # an action starts a turn
                    else:
                        expected[-1] = max(expected[-1], length)
            assert t["context_tokens"] == expected and len(expected) == 4


def test_a_search_on_the_last_turn_is_read_and_its_memory_trained(tiny, searcher):
    """As in the official code, MemSearcher carries out a search on its last turn: the passages are read and the
    memory written from them is trained, then the trajectory stops. ReAct would read them only in a next action:
    its last search is not run."""
    cfg, model, tokenizer = tiny
    questions = r.load_questions(cfg.test_file[0])[:4]
    queries = []

    def counting(batch, k):
        queries.append(len(batch))
        return searcher(batch, k)

    for workflow, searches in [("memsearcher", [4, 4, 4]), ("react", [4, 4])]:
        queries.clear()
        trajs = ms.rollout(model, tokenizer, counting, questions, tiny_config(cfg.output_dir), greedy=True,
                           max_turns=3, workflow=workflow, generate_fn=warm.scripted_policy(questions, 5))
        assert queries == searches
        for t in trajs:
            last = t["turns"][-1]
            assert t["stop"] == "max_turns" and len(t["turns"]) == 3 and t["answer"] is None
            assert t["convs"][-1]["mask"][-1] == 1                     # ends on what the model wrote
            if workflow == "memsearcher":                              # the memory written from the last passages
                assert last["hits"] and last["memory"] == t["memory"] and last["memory_output"].startswith("<memory>")
            else:
                assert "hits" not in last and "memory_output" not in last


def test_memsearcher_context_stays_flat_while_react_grows(tiny, searcher):
    flat, _ = scripted_rollout(tiny, searcher, "memsearcher", searches=7, n=20)
    grows, _ = scripted_rollout(tiny, searcher, "react", searches=7, n=20)
    for t in flat:
        assert len(t["context_tokens"]) == 8
        assert max(t["context_tokens"]) <= 1.3 * t["context_tokens"][1]
    for t in grows:
        assert t["context_tokens"] == sorted(t["context_tokens"])
        assert t["context_tokens"][-1] > 2 * t["context_tokens"][1]


def test_a_react_run_takes_grpo_steps_that_move_its_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(ms, "trajectory_reward", parity_reward)
    cfg = tiny_config(tmp_path, workflow="react", pretrain_steps=0, warm_steps=0, steps=2, group_size=4,
                      questions_per_step=2, eval_n=2, max_new_tokens=8, eval_every=0, print_every=0)
    initial = warm.tiny_policy(cfg)
    train(cfg)
    steps = [rec for rec in runs.read_metrics(tmp_path) if "reward" in rec]
    assert [rec["step"] for rec in steps] == [1, 2] and all(rec["stops"] for rec in steps)
    assert max(rec["mixed_groups"] for rec in steps) > 0 and min(rec["grad_norm"] for rec in steps) > 0
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-000002"
    assert not torch.equal(weights(initial), weights(tmp_path / "checkpoint-000002"))


# ------------------------------------------------------------------------------------------------- generation ---

def test_batched_generate_returns_the_sampled_ids_of_each_context_alone(tiny):
    """Left padding: a batch of contexts of different lengths gives each the ids it gets alone, and those are the
    model's own output ids (never decoded and encoded again)."""
    _, model, tokenizer = tiny
    contexts = [ms.render_prompt(tokenizer, q, m) for q, m in [("Where was Ilvo Marsk born?", ""),
                                                                ("Q?", "a much longer memory than the other one")]]
    batched = ms.generate(model, tokenizer, contexts, 12, greedy=True)
    for context, (ids, text, _) in zip(contexts, batched):
        raw = model.generate(torch.tensor([context]), do_sample=False, max_new_tokens=12)[0, len(context):].tolist()
        assert ids == raw and text == tokenizer.decode(raw, skip_special_tokens=True)


def test_generate_keeps_the_eos_it_stopped_on(tiny):
    """The EOS ends the sampled ids and is kept: a model that never trains its EOS never learns to stop."""
    _, model, tokenizer = tiny
    context = ms.render_prompt(tokenizer, "Where was Ilvo Marsk born?", "")
    first = model(torch.tensor([context])).logits[0, -1].argmax().item()      # what greedy picks first
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [first]
    try:
        (ids, _, stopped), = ms.generate(model, tokenizer, [context], 12, greedy=True)
    finally:
        model.generation_config.eos_token_id = saved
    assert (ids, stopped) == ([first], True)


def test_load_policy_drops_shipped_sampling_defaults_and_keeps_every_end_id(tiny, tmp_path):
    """Qwen2.5-Instruct ships sampling defaults (top_k 20, repetition penalty 1.05, ...) that would change the
    distribution GRPO trains, and stops on two ids: <|im_end|> and <|endoftext|>."""
    cfg, model, tokenizer = tiny
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    end_ids = sorted(tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))
    GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05,
                     eos_token_id=end_ids).save_pretrained(tmp_path)
    loaded = ms.load_policy(str(tmp_path), torch.device("cpu"))[0].generation_config
    assert loaded.eos_token_id == end_ids and not loaded.do_sample
    plain = GenerationConfig()
    assert (loaded.top_k, loaded.top_p, loaded.temperature, loaded.repetition_penalty) == \
        (plain.top_k, plain.top_p, plain.temperature, plain.repetition_penalty)


def test_load_policy_ends_a_generation_at_the_chat_templates_end_of_turn(tiny, tmp_path):
    """A base model ships <|endoftext|> as its only end id, while its chat template closes a turn with <|im_end|>:
    the turn must end there."""
    _, model, tokenizer = tiny
    model.save_pretrained(tmp_path)
    base = copy.deepcopy(tokenizer)
    base.eos_token = "<|endoftext|>"
    base.save_pretrained(tmp_path)
    endoftext, im_end = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    GenerationConfig(eos_token_id=endoftext).save_pretrained(tmp_path)
    loaded = ms.load_policy(str(tmp_path), torch.device("cpu"))[0].generation_config
    assert loaded.eos_token_id == sorted([endoftext, im_end])


def test_generate_ends_each_row_at_its_end_of_turn_through_hugging_face(tiny):
    """A row ends at its first end id (kept) while the other rows of the batch go on, and Hugging Face itself
    stops generating once every row has ended, not at max_new_tokens. The same seed gives the same samples, so
    an id the model samples anyway serves as an extra end id."""
    _, model, tokenizer = tiny
    contexts = [ms.render_prompt(tokenizer, q, "") for q in ["Where was Ilvo Marsk born?", "Who wrote Raith?"]]
    real, generated = model.generate, []                    # how many tokens Hugging Face generated
    model.generate = lambda **kw: (lambda out: generated.append(out.shape[1] - kw["input_ids"].shape[1]) or out)(
        real(**kw))
    end_ids = model.generation_config.eos_token_id

    def sample(contexts, extra_end=None):
        torch.manual_seed(0)
        model.generation_config.eos_token_id = end_ids + ([extra_end] if extra_end is not None else [])
        return [(ids, ended) for ids, _, ended in ms.generate(model, tokenizer, contexts, 24, greedy=False)]

    def first_new(ids, other=()):                           # an id that appears first at position >= 3
        return next(i for i in range(3, len(ids)) if ids[i] not in ids[:i] + list(other) + end_ids)

    try:
        (ids, _), (other, other_ended) = sample(contexts)
        n = first_new(ids, other) + 1
        assert sample(contexts, ids[n - 1]) == [(ids[:n], True), (other, other_ended)]
        (alone, _), = sample(contexts[:1])
        n = first_new(alone) + 1
        generated.clear()
        assert sample(contexts[:1], alone[n - 1]) == [(alone[:n], True)] and generated == [n]
    finally:
        del model.generate
        model.generation_config.eos_token_id = end_ids


# ----------------------------------------------------------------------------------------------------- reward ---

@pytest.mark.parametrize("prediction, golds, em", [
    ("Tarvel", ["Tarvel"], 1.0),
    ("tarvel.", ["Tarvel"], 1.0),                          # case and punctuation
    ("The Vell Orchard", ["Vell Orchard"], 1.0),           # articles
    ("  an   apple ", ["Apple"], 1.0),                     # white space and 'an'
    ("Ilvo-Marsk", ["IlvoMarsk"], 1.0),                    # hyphen is punctuation, removed
    ("Tarvel City", ["Tarvel"], 0.0),                      # no partial credit
    ("Osmaria", ["Tarvel", "osmaria"], 1.0),               # max over gold answers
    ("", ["Tarvel"], 0.0),
    ("theater", ["ater"], 0.0),                            # 'the' only as a whole word
])
def test_exact_match(prediction, golds, em):
    assert ms.exact_match(prediction, golds) == em


@pytest.mark.parametrize("prediction, golds, f1", [
    ("Tarvel", ["Tarvel"], 1.0),
    ("Tarvel City", ["Tarvel"], 2 / 3),                    # precision 1/2, recall 1
    ("Orchard of Vell", ["The Vell Orchard"], 0.8),        # 2 of 3 tokens right, both gold tokens found
    ("the Vell Orchard!", ["Vell Orchard"], 1.0),          # articles and punctuation do not count
    ("Vell Vell", ["Vell"], 2 / 3),                        # a token counts as often as the gold has it
    ("Osmaria north", ["Tarvel", "North Osmaria Bay"], 0.8),   # max over gold answers
    ("Osmaria", ["Tarvel"], 0.0),
    ("", ["Tarvel"], 0.0),
    ("no", ["no way"], 0.0),                               # yes/no/noanswer: all or nothing, as the official code
    ("Tarvel no", ["no"], 0.0),
    ("Yes.", ["yes"], 1.0),
])
def test_token_f1_known_numbers(prediction, golds, f1):
    assert ms.token_f1(prediction, golds) == pytest.approx(f1)


# The official reward (ReCall's compute_score_with_format, on the final conversation), case by case: each row is a
# final turn as this model writes it, how its turn ended, the gold answers, and the official function's score of
# the same turn in the official format (<think> already in the prompt, \\boxed{} for <answer>, <|im_end|> the end
# of turn), computed with the official function.
OFFICIAL_F1 = [
    ("<think> a </think>\n<answer> Tarvel </answer>", "<|im_end|>", ["Tarvel"], 1.0),
    ("<think> a </think>\n<answer> Tarvel </answer>", "<|endoftext|>", ["Tarvel"], 0.0),  # 'not end with eos token'
    ("<think> a </think>\n<answer> Tarvel </answer>", None, ["Tarvel"], 0.0),             # cut by the token limit
    ("<answer> Tarvel </answer>", "<|im_end|>", ["Tarvel"], 0.0),      # no think: '<think> ... not paired'
    ("<think> a </think><answer> Tarvel City </answer>", "<|im_end|>", ["Tarvel"], 2 / 3),
    ("<think> a </think><answer> Osmaria </answer>", "<|im_end|>", ["Tarvel"], 0.1),   # 'wrong answer but good format'
    ("<think> a </think><answer> </answer>", "<|im_end|>", ["Tarvel"], 0.1),           # an empty \\boxed{} too
    ("<think> a </think><answer> the </answer>", "<|im_end|>", ["Tarvel"], 0.1),
    ("<think> a </think><answer> no way </answer>", "<|im_end|>", ["no"], 0.1),       # yes/no: all or nothing
    ("<think> a </think><answer> Yes. </answer>", "<|im_end|>", ["yes"], 1.0),
    ("<think> a </think><answer> Osmaria north </answer>", "<|im_end|>", ["Tarvel", "North Osmaria Bay"], 0.8),
    ("<think> a </think>", "<|im_end|>", ["Tarvel"], 0.0),           # 'the last response is missing \\boxed'
]


@pytest.mark.parametrize("final, end, golds, official", OFFICIAL_F1)
def test_the_f1_reward_is_the_official_score(tiny, searcher, final, end, golds, official):
    cfg, model, tokenizer = tiny
    question = {"id": "0", "question": "Where was Ilvo Marsk born?", "golden_answers": golds}
    t, = ms.rollout(model, tokenizer, searcher, [question], cfg, generate_fn=script(tokenizer, {
        question["question"]: [(final, end)]}))
    assert ms.trajectory_reward(t, "f1") == pytest.approx(official)


def test_only_the_final_conversation_counts_for_the_f1_reward(tiny, searcher):
    """The official rule checks the final conversation alone: MemSearcher's last turn. ReAct's one conversation
    holds every turn, so its first action must think."""
    cfg, model, tokenizer = tiny
    question = {"id": "0", "question": "Where was Ilvo Marsk born?", "golden_answers": ["Tarvel"]}
    unthinking = "<search> Ilvo Marsk </search>"
    for workflow, plays, reward in [
            ("memsearcher", [unthinking, MEMORY, "<think> a </think><answer> Tarvel </answer>"], 1.0),
            ("memsearcher", [SEARCH, MEMORY, "<answer> Tarvel </answer>"], 0.0),
            ("react", [unthinking, "<think> a </think><answer> Tarvel </answer>"], 0.0),
            ("react", [SEARCH, "<think> a </think><answer> Tarvel </answer>"], 1.0)]:
        t, = ms.rollout(model, tokenizer, searcher, [question], cfg, workflow=workflow,
                        generate_fn=script(tokenizer, {question["question"]: plays}))
        assert (t["stop"], ms.trajectory_reward(t, "f1"), ms.trajectory_reward(t, "em")) == ("answered", reward, 1.0)


def test_a_trajectory_that_never_answered_gets_0_under_both_rewards(tiny, searcher):
    cfg, model, tokenizer = tiny
    plays = {f"Where was Ilvo Marsk born (play {i})?": play for i, (_, play) in enumerate(STOP_PLAYS)}
    questions = [{"id": str(i), "question": q, "golden_answers": ["Tarvel"]} for i, q in enumerate(plays)]
    trajs = ms.rollout(model, tokenizer, searcher, questions, cfg, max_turns=3, generate_fn=script(tokenizer, plays))
    for t in trajs:
        rewards = (ms.trajectory_reward(t), ms.trajectory_reward(t, "em"), ms.trajectory_reward(t, "f1"))
        assert rewards == ((1.0, 1.0, 1.0) if t["stop"] == "answered" else (0.0, 0.0, 0.0))   # em is the default
    with pytest.raises(SystemExit, match="--reward must be one of em, f1"):
        parse_args(["--tiny", "--reward", "F1"])


REWARD_PLAYS = {"Where was Ilvo Marsk born?": ["<think> a </think><answer> Tarvel </answer>", "Tarvel"],   # right
                "In which country is Tarvel?": ["<think> a </think><answer> Osmaria Bay </answer>", "Osmaria"],
                "Who founded Vell Orchard?": ["<think> a </think><answer> Ilvo Marsk </answer>", "Tarvel"],  # wrong
                "Which river runs through Tarvel?": ["<think> hmm </think>", "Tarvel"]}         # malformed


def reward_plays(tokenizer, group_size=1):
    """Questions that the scripted policy answers right, partly, wrong, or never -> (questions, generate_fn)."""
    questions = [{"id": str(i), "question": q, "golden_answers": [gold]}
                 for i, (q, (_, gold)) in enumerate(REWARD_PLAYS.items())]
    return questions, script(tokenizer, {q: [play] * group_size for q, (play, _) in REWARD_PLAYS.items()})


def test_a_grpo_step_scores_with_the_reward_flag_and_logs_em_beside_f1(tiny, searcher, monkeypatch):
    cfg, model, tokenizer = tiny
    real_rollout = ms.rollout
    monkeypatch.setattr(ms, "train_on_rows", lambda *a: {})
    for reward, expected in [("em", [1.0, 0.0, 0.0, 0.0]), ("f1", [1.0, 2 / 3, 0.1, 0.0])]:
        questions, play = reward_plays(tokenizer, group_size=2)
        monkeypatch.setattr(ms, "rollout", lambda *a, **kw: real_rollout(*a, **kw, generate_fn=play))
        step_cfg = tiny_config(cfg.output_dir, reward=reward, group_size=2)
        trajs, stats = ms.grpo_step(model, None, None, tokenizer, searcher, questions, step_cfg)
        assert [t["reward"] for t in trajs[::2]] == pytest.approx(expected)
        assert stats["reward"] == pytest.approx(sum(expected) / 4)
        assert stats.get("em") == (None if reward == "em" else 0.25)      # the exact match of the same trajectories


def test_evaluation_reports_exact_match_whatever_the_reward(tiny, searcher, monkeypatch):
    cfg, model, tokenizer = tiny
    questions, play = reward_plays(tokenizer)
    real_rollout = ms.rollout
    monkeypatch.setattr(ms, "rollout", lambda *a, **kw: real_rollout(*a, **kw, generate_fn=play))
    metrics, trajs = ms.evaluate(model, tokenizer, searcher, questions, tiny_config(cfg.output_dir, reward="f1"))
    assert [t["reward"] for t in trajs] == [1.0, 0.0, 0.0, 0.0] and metrics["em"] == 0.25


def test_a_gold_answer_that_normalises_to_nothing_is_matched_only_by_itself():
    assert ms.exact_match("!", ["..."]) == 0.0 and ms.exact_match("", ["..."]) == 0.0
    assert ms.exact_match(" ... ", ["..."]) == 1.0 and ms.exact_match("The Paris!", ["...", "paris"]) == 1.0


# ------------------------------------------------------------------------------------------------------- GRPO ---

def test_group_advantages_known_numbers():
    adv = ms.group_advantages([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0], group_size=4)
    # group 1: mean 0.25, unbiased std 0.5 -> (1 - 0.25) / 0.5 = 1.5 and (0 - 0.25) / 0.5 = -0.5
    assert torch.allclose(adv[:4], torch.tensor([1.5, -0.5, -0.5, -0.5]), atol=1e-5)
    assert torch.equal(adv[4:], torch.zeros(4))             # all equal: zero, not NaN
    assert torch.equal(ms.group_advantages([0.0, 0.0], 2), torch.zeros(2))
    assert torch.equal(ms.group_advantages([1.0, 0.0], 1), torch.tensor([1.0, 0.0]))   # G = 1: A = r


def test_conversation_rows_copy_the_trajectory_advantage_to_every_turn():
    trajs = [{"convs": [{"ids": [1], "mask": [1]}, {"ids": [2], "mask": [1]}]}, {"convs": [{"ids": [3], "mask": [1]}]}]
    rows = ms.conversation_rows(trajs, torch.tensor([0.5, -2.0]))
    assert [(r["ids"], r["adv"]) for r in rows] == [([1], 0.5), ([2], 0.5), ([3], -2.0)]


def slow_reference_loss(trajectories, advantages, clip_eps, dual_clip, kl_coef):
    """Multi-context GRPO written as plain loops: trajectory -> conversation -> token."""
    total, n = 0.0, 0
    for traj, a in zip(trajectories, advantages):
        for conv in traj:                                   # every conversation gets the same advantage
            for lp, old, ref, m in zip(*conv):
                if not m:
                    continue
                ratio = torch.exp(lp - old)
                loss = -min(ratio * a, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * a)
                if a < 0:
                    loss = min(loss, -dual_clip * a)
                loss = loss + kl_coef * (torch.exp(ref - lp) - (ref - lp) - 1)
                total, n = total + loss, n + 1
    return total / n


def test_grpo_loss_equals_slow_per_conversation_reference():
    gen = torch.Generator().manual_seed(0)
    trajectories, advantages = [], [1.3, -0.7, 0.0, -2.5]
    for _ in advantages:                                    # 1-3 conversations of 3-9 tokens each
        convs = []
        for _ in range(int(torch.randint(1, 4, (1,), generator=gen))):
            T = int(torch.randint(3, 10, (1,), generator=gen))
            logp = -torch.rand(T, generator=gen) * 3
            convs.append((logp, logp + 0.5 * torch.randn(T, generator=gen), logp + 0.3 * torch.randn(T, generator=gen),
                          (torch.rand(T, generator=gen) > 0.3).float()))
        trajectories.append(convs)
    rows = [(c, a) for convs, a in zip(trajectories, advantages) for c in convs]
    T = max(len(c[0]) for c, _ in rows)
    pad = lambda i: torch.stack([torch.nn.functional.pad(c[i], (0, T - len(c[i]))) for c, _ in rows])  # noqa: E731
    logp, old, ref, mask = pad(0), pad(1), pad(2), pad(3)
    adv = torch.tensor([a for _, a in rows])
    n_tokens = mask.sum()
    # split into two micro-batches: the token mean over the whole batch must not depend on the split
    loss = sum(ms.grpo_loss(logp[s], old[s], ref[s], adv[s], mask[s], n_tokens, 0.2, 3.0, 0.1)[0]
               for s in (slice(0, 3), slice(3, None)))
    expected = slow_reference_loss(trajectories, advantages, 0.2, 3.0, 0.1)
    assert torch.allclose(loss, expected, atol=1e-6)


def test_chunked_logprobs_equal_full_logits(tiny):
    _, model, _ = tiny
    ids = torch.randint(0, model.config.vocab_size, (3, 17))
    attention = torch.ones_like(ids)
    attention[2, 12:] = 0
    mask = (torch.rand(3, 17) > 0.4).float()
    mask[:, 0] = 0
    mask[2, 12:] = 0
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=ids, attention_mask=attention).logits.float(), -1)
        expected = torch.zeros(3, 17)
        expected[:, 1:] = full[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2)
        got = ms.token_logprobs(model, ids, attention, mask, chunk=5)
    assert torch.allclose(got, expected * mask, atol=1e-5)


def test_positive_advantage_raises_that_conversations_logprob(tiny):
    cfg, model, tokenizer = tiny
    model = ms.load_policy(str(Path(cfg.output_dir) / "tiny-init"), torch.device("cpu"))[0]
    prompt = ms.render_prompt(tokenizer, "Where was Ilvo Marsk born?", "")
    sampled = tokenizer("<search> Ilvo Marsk born </search>", add_special_tokens=False).input_ids
    up = {"ids": prompt + sampled, "mask": [0] * len(prompt) + [1] * len(sampled), "adv": 1.0}
    down = {**up, "ids": prompt + sampled[::-1], "adv": -1.0}

    def logp(row):
        ids, attention, mask, _ = ms.collate([row], tokenizer.pad_token_id, model.device)
        with torch.no_grad():
            return (ms.token_logprobs(model, ids, attention, mask, 64) * mask).sum().item()

    before = logp(up), logp(down)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ms.train_on_rows(model, None, optimizer, [up, down], tiny_config(cfg.output_dir), tokenizer.pad_token_id)
    assert logp(up) > before[0] and logp(down) < before[1]


def test_grpo_loss_known_numbers():
    """Each token's loss by hand: PPO-clip, the dual clip, and the k3 KL with its sign."""
    #                   inside  clipped above  clipped below  dual clip  clipped above
    ratio = torch.tensor([[1.1, 1.5, 0.5, 4.0, 4.0]])
    adv = torch.tensor([1.0])
    logp = torch.full((1, 5), -1.0)
    old = logp - ratio.log()
    mask = torch.ones(1, 5)
    per_token = lambda a: [ms.grpo_loss(logp[:, i:i + 1], old[:, i:i + 1], None, a, mask[:, i:i + 1], 1,  # noqa: E731
                                        0.2, 3.0, 0.0)[0].item() for i in range(5)]
    # A = +1: -min(r, clip(r)) -> -1.1, -1.2 (clipped), -0.5, -1.2, -1.2
    assert per_token(adv) == pytest.approx([-1.1, -1.2, -0.5, -1.2, -1.2], abs=1e-5)
    # A = -1: max(r, clip(r)), capped at c = 3 by the dual clip -> 1.1, 1.5, 0.8 (clipped), 3.0, 3.0
    assert per_token(-adv) == pytest.approx([1.1, 1.5, 0.8, 3.0, 3.0], abs=1e-5)
    # k3 KL(pi || pi_ref) with d = log pi_ref - log pi = -1: exp(-1) + 1 - 1 = 0.3679 (the flipped sign: 0.7183)
    loss, stats = ms.grpo_loss(logp[:, :1], logp[:, :1], logp[:, :1] - 1, torch.zeros(1), mask[:, :1], 1,
                               0.2, 3.0, kl_coef=2.0)
    assert stats["kl"] == pytest.approx(math.exp(-1), abs=1e-5) and loss.item() == pytest.approx(2 * math.exp(-1))
    # the mean is over the n_tokens given (the whole mini-batch), not over this call's own tokens
    half = ms.grpo_loss(logp, old, None, adv, mask, 10, 0.2, 3.0, 0.0)[0]
    assert half.item() == pytest.approx(sum(per_token(adv)) / 10, abs=1e-5)


def sgd_update(model, rows, cfg):
    """The parameter change of one train_on_rows call with plain SGD (lr 1, no clipping): linear in the loss."""
    before = [p.detach().clone() for p in model.parameters()]
    ms.train_on_rows(model, None, torch.optim.SGD(model.parameters(), lr=1.0), rows, cfg, 0)
    delta = [p.detach() - b for p, b in zip(model.parameters(), before)]
    with torch.no_grad():
        for p, b in zip(model.parameters(), before):
            p.copy_(b)
    return torch.cat([d.flatten() for d in delta])


def test_update_is_a_token_mean_over_the_mini_batch(tiny):
    """The same update whichever way rows are split into micro-batches, and zero-advantage rows (skipped in
    the forward pass) still count in the token mean."""
    cfg, model, tokenizer = tiny
    gen = torch.Generator().manual_seed(0)
    rows = []
    for length, sampled, adv in [(12, 5, 1.5), (9, 7, -0.5), (15, 3, 0.8), (10, 6, 0.0)]:
        ids = torch.randint(3, len(tokenizer), (length,), generator=gen).tolist()
        rows.append({"ids": ids, "mask": [0] * (length - sampled) + [1] * sampled, "adv": adv})
    one_batch = sgd_update(model, rows, tiny_config(cfg.output_dir, grad_clip=1e9, micro_batch_tokens=10**6))
    row_each = sgd_update(model, rows, tiny_config(cfg.output_dir, grad_clip=1e9, micro_batch_tokens=1))
    assert one_batch.abs().sum() > 0
    assert torch.allclose(one_batch, row_each, atol=1e-6)
    # without the zero-advantage row the mean is over 15 sampled tokens instead of 21
    without = sgd_update(model, rows[:3], tiny_config(cfg.output_dir, grad_clip=1e9))
    assert torch.allclose(one_batch, without * 15 / 21, atol=1e-6)


def random_rows(tokenizer, spec, seed=0):
    """Rows of random ids: spec is [(length, sampled tokens at the end, advantage), ...]."""
    gen = torch.Generator().manual_seed(seed)
    return [{"ids": torch.randint(3, len(tokenizer), (length,), generator=gen).tolist(),
             "mask": [0] * (length - sampled) + [1] * sampled, "adv": adv} for length, sampled, adv in spec]


def test_later_updates_compare_with_the_policy_that_sampled(tiny, monkeypatch):
    """With two updates per batch, the second one's ratio is pi / pi_rollout with pi_rollout frozen before the
    first update: the policy has moved, so the ratio is no longer 1 and the clip can act."""
    cfg, model, tokenizer = tiny
    model = copy.deepcopy(model)
    rows = random_rows(tokenizer, [(12, 5, 1.0), (10, 6, -1.0), (14, 4, 1.0), (9, 5, -1.0)])
    seen, real_loss = [], ms.grpo_loss
    monkeypatch.setattr(ms, "grpo_loss", lambda logp, old, *a: seen.append((logp.detach(), old)) or real_loss(
        logp, old, *a))
    ms.train_on_rows(model, None, torch.optim.SGD(model.parameters(), lr=1.0), rows,
                     tiny_config(cfg.output_dir, updates_per_step=2, micro_batch_tokens=10**6), tokenizer.pad_token_id)
    (first, first_old), (second, second_old) = seen
    assert torch.equal(first, first_old)                    # the first update: the policy that sampled
    assert (second - second_old).abs().max() > 1e-3         # the second: the policy has moved since


def test_zero_advantage_rows_are_trained_by_the_kl_term(tiny):
    """With a KL term, a row with advantage 0 still has a gradient (its KL to the reference): it is not skipped."""
    cfg, model, tokenizer = tiny
    policy, ref = copy.deepcopy(model), sharpened(model).requires_grad_(False)
    rows = random_rows(tokenizer, [(12, 5, 0.0), (10, 6, 0.0)])
    before = [p.detach().clone() for p in policy.parameters()]
    ms.train_on_rows(policy, ref, torch.optim.SGD(policy.parameters(), lr=1.0), rows,
                     tiny_config(cfg.output_dir, kl_coef=0.1), tokenizer.pad_token_id)
    assert max((p - b).abs().max().item() for p, b in zip(policy.parameters(), before)) > 0


def test_a_batch_of_skipped_rows_still_takes_the_optimizer_step(tiny, monkeypatch):
    """Skipping zero-advantage rows (no KL) changes nothing: AdamW still steps on a zero gradient (its momentum
    and weight decay move the weights) exactly as if the rows had run."""
    cfg, model, tokenizer = tiny
    quiet = tiny_config(cfg.output_dir, weight_decay=0.1)
    moved = []
    for skip in (True, False):
        policy = copy.deepcopy(model)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2, weight_decay=quiet.weight_decay)
        ms.train_on_rows(policy, None, optimizer, random_rows(tokenizer, [(12, 5, 1.0), (10, 6, -1.0)]), quiet, 0)
        if not skip:
            monkeypatch.setattr(ms, "needs_forward", lambda row, cfg: True)
        before = [p.detach().clone() for p in policy.parameters()]
        ms.train_on_rows(policy, None, optimizer, random_rows(tokenizer, [(12, 5, 0.0), (10, 6, 0.0)], 1), quiet, 0)
        moved.append(torch.cat([(p.detach() - b).flatten() for p, b in zip(policy.parameters(), before)]))
    assert moved[0].abs().max() > 0 and torch.allclose(moved[0], moved[1], atol=1e-7)


def test_clip_fraction_counts_where_the_clip_binds():
    """A ratio outside [0.8, 1.2] is clipped only when that lowers the objective: above 1.2 with A > 0, below 0.8
    with A < 0 (verl's pg_clipfrac)."""
    ratio = torch.tensor([[1.5, 0.5, 1.1], [1.5, 0.5, 1.1]])
    logp = torch.zeros(2, 3)
    _, stats = ms.grpo_loss(logp, -ratio.log(), None, torch.tensor([1.0, -1.0]), torch.ones(2, 3), 6, 0.2, 3.0, 0.0)
    assert stats["clip_frac"] == 2                          # 1.5 with A = +1 and 0.5 with A = -1


def test_sampler_reaches_every_token_of_a_qwen_sized_vocabulary(monkeypatch):
    """Inverse CDF over 151,936 tokens: u in token k's interval draws token k, the rarest tokens included. Here one
    token has p = 0.997 and the others 2e-8 each: a float32 running sum stops growing after the first token (2e-8
    is below half its precision near 1), leaving the other 151,935 tokens no interval at all."""
    vocab, rare = 151_936, 2e-8
    probs = torch.full((vocab,), rare, dtype=torch.float64)
    probs[0] = 1 - rare * (vocab - 1)
    picks = [0, 1, 75_000, vocab - 1]
    u = torch.tensor([[probs[:k].sum() + probs[k] / 2] for k in picks], dtype=torch.float64)   # mid-interval
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: u.to(kw.get("dtype", torch.float32)))
    scores = ms.SampleFromSoftmax(1.0)(None, probs.log().float().expand(len(picks), vocab))
    assert scores.argmax(dim=1).tolist() == picks


def sharpened(model):
    """A copy of the random tiny model with logits 4x larger: far from uniform, so the temperature matters
    (top token: p = 0.32 at T = 0.5, 0.02 at T = 1)."""
    sharp = copy.deepcopy(model)
    with torch.no_grad():
        sharp.model.norm.weight.mul_(4)
    return sharp


def test_sampler_frequencies_match_token_logprobs_at_temperature(tiny):
    cfg, model, tokenizer = tiny
    model = sharpened(model)
    context = ms.render_prompt(tokenizer, "Where was Ilvo Marsk born?", "")
    torch.manual_seed(0)
    n = 3000
    outs = ms.generate(model, tokenizer, [context] * n, max_new_tokens=1, greedy=False, temperature=0.5)
    counts = Counter(ids[0] for ids, _, _ in outs)
    top = [token for token, _ in counts.most_common(3)]
    ids = torch.tensor([context + [t] for t in top])
    mask = torch.zeros_like(ids, dtype=torch.float32)
    mask[:, -1] = 1
    with torch.no_grad():
        p_half = ms.token_logprobs(model, ids, torch.ones_like(ids), mask, 64, temperature=0.5)[:, -1].exp()
        p_one = ms.token_logprobs(model, ids, torch.ones_like(ids), mask, 64, temperature=1.0)[:, -1].exp()
    freq = torch.tensor([counts[t] / n for t in top])
    assert (freq - p_half).abs().max() < 0.03, (freq, p_half)         # 4 standard errors at most
    assert (freq - p_one).abs().max() > 0.1                             # T = 1 would be visibly wrong


def test_every_logprob_in_the_loss_is_taken_at_the_sampling_temperature(tiny, monkeypatch):
    """Current, rollout ("old") and reference log-probs all at T = 0.5: before the first update they are equal,
    so the ratio is 1 and the KL 0, and they are log softmax(logits / 0.5)."""
    cfg, model, tokenizer = tiny
    policy, ref = sharpened(model), sharpened(model)
    prompt = ms.render_prompt(tokenizer, "Where was Ilvo Marsk born?", "")
    sampled = tokenizer("<search> Ilvo Marsk born </search>", add_special_tokens=False).input_ids
    rows = [{"ids": prompt + sampled, "mask": [0] * len(prompt) + [1] * len(sampled), "adv": a} for a in [1.0, -1.0]]
    seen = []
    real_loss = ms.grpo_loss
    monkeypatch.setattr(ms, "grpo_loss", lambda *args: seen.append(args) or real_loss(*args))
    hot = tiny_config(cfg.output_dir, temperature=0.5, updates_per_step=2, kl_coef=0.1)
    ms.train_on_rows(policy, ref, torch.optim.SGD(policy.parameters(), lr=0.1), rows, hot, tokenizer.pad_token_id)
    logp, old, ref_logp, _, mask = seen[0][:5]
    ids, attention, _, _ = ms.collate(rows[:1], tokenizer.pad_token_id, policy.device)   # both rows: same ids
    with torch.no_grad():
        by_hand = torch.log_softmax(ref(input_ids=ids, attention_mask=attention).logits / 0.5, -1)
    expected = by_hand[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2) * mask[:, 1:]
    assert torch.allclose(logp[:, 1:].detach(), expected, atol=1e-4)
    assert torch.allclose(old, logp.detach(), atol=1e-5) and torch.allclose(ref_logp, logp.detach(), atol=1e-5)


def test_checkpointed_logprob_chunks_give_the_same_gradient(tiny, monkeypatch):
    _, model, tokenizer = tiny
    ids = torch.randint(3, len(tokenizer), (2, 20))
    mask = torch.ones(2, 20)

    def gradient():
        model.zero_grad()
        (ms.token_logprobs(model, ids, torch.ones_like(ids), mask, chunk=7) * mask).sum().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    plain = gradient()
    monkeypatch.setattr(ms, "RECOMPUTE_LOGITS_ABOVE_BYTES", 0)        # checkpoint every chunk
    assert torch.allclose(gradient(), plain, atol=1e-6)


def test_padded_rows_get_the_same_logprobs_as_alone(tiny):
    """collate pads on the right, so a row's positions do not depend on the longest row of its micro-batch; the
    mask comes from the row, never from token ids (a sampled token equal to the pad id is still trained)."""
    _, model, tokenizer = tiny
    rows = [{"ids": list(range(5, 5 + n)), "mask": [0] * 2 + [1] * (n - 2), "adv": 1.0} for n in (6, 13)]
    rows[0]["ids"][-1] = tokenizer.pad_token_id

    def logprobs(batch):
        ids, attention, mask, _ = ms.collate(batch, tokenizer.pad_token_id, model.device)
        assert mask.tolist() == [row["mask"] + [0] * (ids.shape[1] - len(row["mask"])) for row in batch]
        with torch.no_grad():
            return ms.token_logprobs(model, ids, attention, mask, chunk=4)

    together = logprobs(rows)
    for i, row in enumerate(rows):
        alone = logprobs([row])[0]
        assert torch.allclose(together[i, :len(row["ids"])], alone, atol=1e-5)
        assert (alone != 0).tolist() == [False] + [bool(m) for m in row["mask"][1:]]


@pytest.mark.slow
def test_small_update_with_qwen_vocabulary_kl_and_two_updates(tiny, monkeypatch):
    """The --small update on the CPU: a Qwen2.5-0.5B-shaped layer (hidden 896, 14 heads, 2 KV heads) with the full
    151,936-token vocabulary, two PPO updates per batch, the k3 KL to a frozen reference. The KL starts at 0 (the
    policy is the reference), and the update moves each conversation's log-prob the way of its advantage."""
    cfg, _, tokenizer = tiny
    torch.manual_seed(0)
    policy = qwen25_05b_shaped(layers=1)
    assert (policy.config.vocab_size, policy.config.hidden_size) == (151_936, 896)
    ref = copy.deepcopy(policy).requires_grad_(False).eval()
    prompt = ms.render_prompt(tokenizer, "Where was Ilvo Marsk born?", "")
    up = tokenizer("<search> Ilvo Marsk born </search>", add_special_tokens=False).input_ids
    down = tokenizer("<answer> Tarvel </answer>", add_special_tokens=False).input_ids
    rows = [{"ids": prompt + s, "mask": [0] * len(prompt) + [1] * len(s), "adv": a}
            for s, a in [(up, 1.0), (down, -1.0)]]
    small = ms.Config(**{**ms.PRESETS["small"], "output_dir": cfg.output_dir})
    assert small.updates_per_step == 2 and small.kl_coef > 0
    kls, losses = [], []
    real_loss = ms.grpo_loss

    def spy(*args):
        loss, stats = real_loss(*args)
        kls.append(stats["kl"])
        losses.append(loss.item())
        return loss, stats

    def logp(row):
        ids, attention, mask, _ = ms.collate([row], tokenizer.pad_token_id, policy.device)
        with torch.no_grad():
            return (ms.token_logprobs(policy, ids, attention, mask, small.logprob_chunk) * mask).sum().item()

    before = [logp(r) for r in rows]
    monkeypatch.setattr(ms, "grpo_loss", spy)
    random.seed(0)                                        # which row goes to which of the two mini-batches
    stats = ms.train_on_rows(policy, ref, torch.optim.SGD(policy.parameters(), lr=0.1), rows, small,
                             tokenizer.pad_token_id)
    assert len(kls) == 2 and kls[0] == pytest.approx(0, abs=1e-6) and kls[1] > 0   # moved after the first update
    assert stats["loss"] == pytest.approx(sum(losses) / 2) and stats["grad_norm"] > 0    # mean of the 2 updates
    assert stats["kl"] == pytest.approx(sum(kls) / sum(sum(r["mask"]) for r in rows))    # per forwarded token
    assert 0 <= stats["clip_frac"] <= 1
    after = [logp(r) for r in rows]
    assert after[0] > before[0] and after[1] < before[1]


@pytest.mark.parametrize("cpu_bf16", [False, True])
def test_the_kl_is_exactly_0_before_the_first_update(tmp_path, monkeypatch, cpu_bf16):
    """The run's reference is loaded and run like the policy (fp32 weights, the same autocast): step 1's KL, taken
    before its one update, is 0 to the last bit."""
    monkeypatch.setattr(ms, "trajectory_reward", parity_reward)          # mixed groups: rows get a forward pass
    cfg = quick_config(tmp_path / "run", steps=1, kl_coef=0.1, updates_per_step=1, cpu_bf16=cpu_bf16)
    train(cfg)
    step, = [rec for rec in runs.read_metrics(tmp_path / "run") if "kl" in rec]
    assert step["mixed_groups"] > 0 and step["kl"] == 0.0


def test_a_steps_questions_depend_on_the_seed_and_the_step_alone():
    """Both workflows of a comparison, and a resumed run, train on the same questions at every step: however much
    of the global random stream an update consumed before (train_on_rows shuffles a number of rows that depends
    on the workflow)."""
    questions = [{"id": i} for i in range(500)]
    cfg = ms.Config(questions_per_step=16, seed=3)
    first = [ms.begin_step(questions, cfg, step) for step in range(3)]
    random.shuffle(list(range(777)))                        # what an update of 777 rows would draw
    assert [ms.begin_step(questions, cfg, step) for step in range(3)] == first
    assert len({tuple(q["id"] for q in batch) for batch in first}) == 3 and all(len(b) == 16 for b in first)
    assert ms.begin_step(questions, ms.Config(questions_per_step=16, seed=4), 0) != first[0]


def test_grpo_step_groups_G_copies_and_gives_every_conversation_its_advantage(tiny, searcher, monkeypatch):
    cfg, model, tokenizer = tiny
    seen = {}

    def scripted_rollout(model, tokenizer, search, questions, cfg):      # 1-3 conversations, rewards 0 1 0 1 ...
        seen["questions"] = questions
        return [{**ms.new_trajectory(q), "answer": q["golden_answers"][0] if i % 2 else None,
                 "convs": [{"ids": [7, i, turn], "mask": [0, 1, 1]} for turn in range(1 + i % 3)]}
                for i, q in enumerate(questions)]

    monkeypatch.setattr(ms, "rollout", scripted_rollout)
    monkeypatch.setattr(ms, "train_on_rows", lambda model, ref, opt, rows, cfg, pad: seen.update(rows=rows) or {})
    step_cfg = tiny_config(cfg.output_dir, group_size=4, questions_per_step=3)
    batch = ms.begin_step(r.load_questions(cfg.test_file[0]), step_cfg, step=0)
    trajs, stats = ms.grpo_step(model, None, None, tokenizer, searcher, batch, step_cfg)
    ids = [q["id"] for q in seen["questions"]]
    assert len(set(ids)) == 3 and ids == [i for i in ids[::4] for _ in range(4)]     # G copies, consecutively
    advantages = ms.group_advantages([t["reward"] for t in trajs], 4)
    assert advantages.abs().min() > 0
    assert [(row["ids"], row["mask"], row["adv"]) for row in seen["rows"]] == \
        [(c["ids"], c["mask"], float(a)) for t, a in zip(trajs, advantages) for c in t["convs"]]
    assert (stats["reward"], stats["mixed_groups"]) == (0.5, 1.0)


# ------------------------------------------------------------------------------------------ the training loop ---

@pytest.mark.slow
def test_grpo_lifts_greedy_em_over_the_imitator(learned):
    """Multi-context GRPO must beat the imperfect imitator by 4 test questions or more (of 60).

    The threshold sits halfway between the real method and the best broken one, measured with this seed by
    `python docs/mutants.py --learning 1 4 5` (EM before -> after GRPO): the method as it is 0.000 -> 0.117 (+7
    questions); the advantage's sign flipped 0.000 -> 0.017; every token of a conversation trained 0.000 ->
    0.000; the advantage only on each trajectory's final conversation 0.000 -> 0.000 (the forgetting happens in
    the memory-writing turns before it). Another CPU may round floats otherwise and sample other trajectories:
    seeds 1 and 2, which stand in for them, gave +7 and +10 questions.
    """
    _, before, after = learned
    print(f"learning test: greedy EM {before['em']:.3f} -> {after['em']:.3f}")      # docs/mutants.py --learning
    assert after["em"] - before["em"] > 0.06, (before, after)       # 4 questions or more (3 are 0.050)
    assert after["answered"] > before["answered"]


def test_repeated_test_files_give_em_per_benchmark_and_their_average(tmp_path):
    files = []
    for name, answers in [("hotpotqa", ["a", "b", "c", "d"]), ("nq", ["a", "b"])]:
        (tmp_path / name).mkdir()
        files.append(tmp_path / name / "test.jsonl")
        files[-1].write_text("".join(json.dumps({"id": str(i), "question": f"q{i}?", "golden_answers": [a]}) + "\n"
                                     for i, a in enumerate(answers)))
    cfg = parse_args(["--tiny", "--test-file", str(files[0]), "--test-file", str(files[1]), "--eval-n", "3"])
    assert cfg.test_file == [str(f) for f in files]
    _, test_qs, _ = ms.load_data(cfg)
    assert [q["source"] for q in test_qs] == ["HotpotQA"] * 3 + ["NQ"] * 2           # --eval-n is per file
    trajs = [{**ms.new_trajectory(q), "reward": float(q["source"] == "NQ" or q["id"] == "0")} for q in test_qs]
    metrics = ms.summarize(trajs)
    assert metrics["em_by_benchmark"] == {"HotpotQA": 1 / 3, "NQ": 1.0}
    header, values = runs.benchmark_table(metrics["em_by_benchmark"]).split("\n")
    assert header.split() == ["NQ", "HotpotQA", "Avg"]                                  # the paper's order
    assert values.split() == ["1.000", "0.333", "0.667"]                                # Avg over benchmarks


def test_two_test_files_of_one_name_get_two_columns(tmp_path):
    for folder in "ab":
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "questions.jsonl").write_text('{"question": "q?", "golden_answers": ["x"]}\n')
    cfg = quick_config(tmp_path / "run", test_file=[str(tmp_path / f / "questions.jsonl") for f in "ab"])
    _, test_qs, _ = ms.load_data(cfg)
    assert [q["source"] for q in test_qs] == [f"questions ({tmp_path / f})" for f in "ab"]


def test_question_types_null_mixed_or_in_metadata(tmp_path):
    path = tmp_path / "q.jsonl"
    lines = [{"question": "a?", "golden_answers": ["a"], "type": None},
             {"question": "b?", "golden_answers": ["b"], "type": 2},
             {"question": "c?", "golden_answers": ["c"], "metadata": {"type": "bridge"}},
             {"question": "d?", "golden_answers": ["d"], "type": "bridge"}]
    path.write_bytes(codecs.BOM_UTF8 + "".join(json.dumps(q) + "\n" for q in lines).encode())   # with a BOM
    questions = r.load_questions(path)
    trajs = [{**ms.new_trajectory(q), "reward": 1.0} for q in questions]
    assert ms.summarize(trajs)["em_by_type"] == {"2": 1.0, "bridge": 1.0}
    untyped = [{**ms.new_trajectory({"question": "q?", "golden_answers": ["a"]}), "reward": 0.0}]
    assert ms.summarize(untyped)["em_by_type"] == {}


def test_user_errors_are_one_line_bugs_keep_their_traceback(tmp_path, monkeypatch):
    path = tmp_path / "test.jsonl"
    path.write_text('{"question": "q?", "golden_answers": []}\n')
    args = ["--tiny", "--output-dir", str(tmp_path / "run"), "--warm-start-dir", str(tmp_path / "warm"),
            "--pretrain-steps", "0", "--warm-steps", "0", "--test-file", str(path)]
    with pytest.raises(SystemExit) as stop:
        ms.main(args)
    assert str(stop.value.code).startswith(f"memsearcher.py: {path}:1: \"golden_answers\" must be a non-empty")
    monkeypatch.setenv("MEMSEARCHER_TRACEBACK", "1")
    with pytest.raises(r.DataError):
        ms.main(args)


def test_run_as_a_script_the_file_is_one_module(tmp_path):
    """`python memsearcher.py` runs the file as __main__, and data/warm_start.py, which main imports, imports
    memsearcher: it must get that same module, not a second copy (another Config class, other module state)."""
    bare = tmp_path / "train.jsonl"                       # no hop chains: the cold start refuses it at once
    bare.write_text(json.dumps({"id": "q1", "question": "Who?", "golden_answers": ["Me"]}) + "\n")
    code = ("import runpy, sys\n"
            f"sys.argv = ['memsearcher.py', '--small', '--train-file', {str(bare)!r}]\n"
            "try:\n    runpy.run_path('memsearcher.py', run_name='__main__')\n"
            "except SystemExit as stop:\n    print(stop.code)\n"
            "import data.warm_start\nprint('module:', data.warm_start.ms.__name__)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert "lack it" in result.stdout and result.stdout.rstrip().endswith("module: __main__"), result.stderr


# ------------------------------------------------------------------------------------------- loading the data ---

def test_retriever_timeout_and_retries_reach_the_server_client():
    with serve(lambda req, n: (200, search_r1_answer(req), 1.0)) as (url, server):
        cfg = parse_args(["--tiny", "--retriever-url", url, "--retriever-timeout", "0.2",
                             "--retriever-retries", "1"])
        _, _, search = ms.load_data(cfg)
        start = time.time()
        with pytest.raises(r.RetrievalError, match="no answer within 0.2 s"):
            search(["q"], 1)
        assert time.time() - start < 2.5 and len(server.requests) == 2


def test_a_huge_passage_is_cut_and_reported(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "big", "contents": "Huge\n" + "word " * 1_000_000}) + "\n"
                      + json.dumps({"id": "small", "contents": "Small\nwords"}) + "\n")
    _, _, search = ms.load_data(quick_config(tmp_path / "run", corpus=str(corpus), max_passage_chars=1000))
    hit, = [h for h in search(["word"], 2)[0] if h["id"] == "big"]
    assert len(hit["text"]) == 1000 and "cut from 4,999,999 to 1,000 characters" in capsys.readouterr().err
