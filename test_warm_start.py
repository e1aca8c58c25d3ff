"""Tests for data/warm_start.py: the tiny model's warm start and another model's cold start (the scripted
experts, imitation, building once and reusing), offline on the CPU.

    HF_HUB_OFFLINE=1 python -m pytest -q test_warm_start.py
"""
import codecs
import json
import re
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import data.warm_start as warm
import memsearcher as ms
import retriever as r
import runs
from conftest import ROOT, parity_reward, tiny_config, train, weights
from retriever import local_searcher


def test_react_expert_makes_the_same_mistakes_in_one_masked_conversation(tiny, searcher):
    """The ReAct expert: one conversation = prompt 0 | search 1 | passages 0 | ... | answer 1, no memory. At the
    same rate and with the same random draws, it restates a fact at the start of its next thought exactly when
    the MemSearcher expert writes it into its memory, and fails exactly the same questions; at its own default
    rate it fails about as often."""
    cfg, _, tokenizer = tiny
    questions = r.load_questions(cfg.train_file[0])[:200]

    def play(workflow, **rates):                    # as imitate() plays them
        return warm.expert_trajectories(questions, searcher, tokenizer,
                                        tiny_config(cfg.output_dir, workflow=workflow, **rates))

    def written(t):                                 # what the expert wrote: every trained token
        return tokenizer.decode([i for c in t["convs"] for i, m in zip(c["ids"], c["mask"]) if m])

    def failed(trajs):
        return sum(t["reward"] == 0 for t in trajs) / len(trajs)

    memsearcher, react = play("memsearcher"), play("react", expert_lose_track=ms.Config().expert_forget)
    assert [t["reward"] for t in react] == [t["reward"] for t in memsearcher] and 0.2 < failed(react) < 0.8
    kept = {"memsearcher": [], "react": []}         # after each passage read: was its fact taken in?
    for mem, rea in zip(memsearcher, react):
        facts = [h["fact"] for h in mem["question"]["support"]]
        held = [sum(f in m for f in facts) for m in re.findall(r"<memory>(.*?)</memory>", written(mem))]
        kept["memsearcher"] += [now > before for before, now in zip([0] + held, held)]
        thoughts = re.findall(r"<think>(.*?)</think>", written(rea))[1:]        # every thought after a passage
        kept["react"] += [any(th.strip().startswith(f) for f in facts) for th in thoughts]
    assert kept["react"] == kept["memsearcher"] and 0.3 < sum(kept["react"]) / len(kept["react"]) < 0.9
    react = play("react")                           # --expert-lose-track 0.65 against --expert-forget 0.6
    assert 0 < failed(react) - failed(memsearcher) < 0.06
    same = sum(a["reward"] == b["reward"] for a, b in zip(react, memsearcher)) / len(questions)
    assert same > 0.9                               # coupled per question: a few more mistakes, on the same draws
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids              # noqa: E731
    for t in react:
        conv, = t["convs"]
        ids, mask = conv["ids"], conv["mask"]
        prompt = ms.render_prompt(tokenizer, t["question"]["question"], None, "react")
        assert ids[:len(prompt)] == prompt and not any(mask[:len(prompt)])
        i, actions = len(prompt), []
        while i < len(ids):                         # alternate: a trained action, then untrained passages
            j = i
            while j < len(ids) and mask[j] == mask[i]:
                j += 1
            text = tokenizer.decode(ids[i:j])
            if mask[i]:
                actions.append(ms.parse_action(text))
                assert ids[i:j] == encode(text) and "<memory>" not in text and text.endswith("<|im_end|>")
            else:                                   # a user turn with the passages, then the next turn opens
                assert text.startswith("\n<|im_start|>user\n<information>")
                assert text.endswith("</information>\n<|im_end|>\n<|im_start|>assistant\n")
            i = j
        assert all(kind == "search" for kind, _ in actions[:-1]) and actions[-1][0] in ("search", "answer")
        assert (t["stop"] == "answered") == (actions[-1][0] == "answer")


def test_a_presets_warm_start_only_for_the_model_it_names(tmp_path):
    built = ms.parse_args(["--tiny"])
    assert (built.model, built.pretrain_steps, built.warm_steps) == ("tiny", 300, 3600)
    loaded = ms.parse_args(["--tiny", "--model", str(tmp_path)])           # a checkpoint folder
    assert (loaded.pretrain_steps, loaded.warm_steps, loaded.group_size) == (0, 0, 8)
    small = ms.parse_args(["--small"])                                     # Qwen2.5-0.5B-Instruct's cold start
    assert (small.model, small.pretrain_steps, small.warm_steps, small.cold_lr) == (ms.Config.model, 0, 300, 1e-5)
    assert ms.parse_args(["--small", "--model", str(tmp_path)]).warm_steps == 0
    assert ms.parse_args(["--small", "--model", "tiny"]).warm_steps == 0
    # another model asks for its own cold start, imitation only
    cold = ms.parse_args(["--tiny", "--model", str(tmp_path), "--warm-steps", "5"])
    assert (cold.pretrain_steps, cold.warm_steps, cold.cold_lr) == (0, 5, 1e-5)


def test_warm_start_is_built_once_per_setting_and_reused(tmp_path, capsys, monkeypatch):
    """A later run with the same settings loads the kept warm start, and its GRPO run is the same run."""
    few = tmp_path / "train.jsonl"                        # 100 questions: the expert plays every one
    few.write_text("".join(open(ROOT / "data" / "train.jsonl").readlines()[:100]))
    cfg = tiny_config(tmp_path / "a", train_file=[str(few)], pretrain_steps=3, warm_steps=4, steps=1, group_size=4,
                      questions_per_step=2, eval_n=3, max_new_tokens=16, eval_every=0, print_every=0)
    cfg.warm_start_dir = str(tmp_path / "warm")
    built = warm.tiny_policy(cfg)
    assert "warm start: building" in capsys.readouterr().out
    assert warm.tiny_policy(cfg) == built and "warm start: reusing" in capsys.readouterr().out
    record = json.loads((Path(built) / "warm_start.json").read_text())
    assert record["settings"]["warm_steps"] == 4 and len(record["imitation"]["loss_every_10_steps"]) == 1
    other = warm.tiny_policy(ms.Config(**{**asdict(cfg), "warm_steps": 5}))      # another setting, another model
    assert other != built
    rebuilt = warm.tiny_policy(ms.Config(**{**asdict(cfg), "rebuild_warm_start": True}))
    assert rebuilt == built and "warm start: building" in capsys.readouterr().out
    # GRPO after building (run a) and after reusing (run b): the same run, with updates that move the weights
    # (parity_reward gives the barely imitated model mixed groups)
    monkeypatch.setattr(ms, "trajectory_reward", parity_reward)
    first = train(cfg)
    second = train(ms.Config(**{**asdict(cfg), "output_dir": str(tmp_path / "b")}))
    assert first == second
    logs = [[{k: v for k, v in rec.items() if not k.endswith("_s")} for rec in runs.read_metrics(tmp_path / run)]
            for run in "ab"]
    assert logs[0] == logs[1] and logs[0][1]["mixed_groups"] > 0 and logs[0][1]["grad_norm"] > 0
    assert torch.equal(weights(tmp_path / "a" / "checkpoint-000001"), weights(tmp_path / "b" / "checkpoint-000001"))
    assert not torch.equal(weights(built), weights(tmp_path / "a" / "checkpoint-000001"))


@pytest.fixture(scope="session")
def qwen_model(tmp_path_factory):
    """A model folder that is not the tiny one: Qwen2.5's real tokenizer and chat template (built offline) and a
    random Qwen2 of one layer of hidden size 64 over its 151,936-row vocabulary."""
    from data.qwen_tokenizer import qwen25_tokenizer
    path = Path(qwen25_tokenizer(tmp_path_factory.mktemp("qwen2-h64")))
    torch.manual_seed(0)
    warm.small_qwen2(151_936, 64, 1, bos_token_id=None, eos_token_id=151645,
                     pad_token_id=151643).save_pretrained(path)
    return path


def cold_start_args(tmp_path, model, train_file):
    """--small with another model, cold-started for a few imitation steps, then one GRPO step."""
    return ["--small", "--model", str(model), "--warm-steps", "4", "--warm-batch", "2", "--cold-lr", "1e-2",
            "--train-file", str(train_file), "--top-k", "1", "--max-turns", "2", "--eval-max-turns", "2",
            "--max-new-tokens", "8", "--steps", "1", "--group-size", "4", "--questions-per-step", "2", "--eval-n", "2",
            "--eval-every", "0", "--print-every", "0", "--output-dir", str(tmp_path / "run"),
            "--warm-start-dir", str(tmp_path / "warm")]


def expert_nll(path, convs, cfg):
    """Mean negative log-likelihood of the expert's tokens (the loss mask) under the model in `path`."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids, attention, mask, _ = ms.collate(convs, model.config.pad_token_id, model.device)
    with torch.no_grad():
        logp = ms.token_logprobs(model, ids, attention, mask, cfg.logprob_chunk)
    return (-(logp * mask).sum() / mask.sum()).item()


@pytest.mark.slow
def test_another_model_is_cold_started_once_then_grpo_starts_from_it(tmp_path, qwen_model, capsys, monkeypatch):
    """A model that is not the tiny one imitates the expert (its conversations in Qwen's chat template): the kept
    folder imitates better than the model did, a later run reuses it, and its GRPO starts from it and keeps it as
    the KL reference."""
    few = tmp_path / "train.jsonl"                        # the expert plays every training question
    few.write_text("".join(open(ROOT / "data" / "train.jsonl").readlines()[:10]))
    args = cold_start_args(tmp_path, qwen_model, few)
    cfg = ms.parse_args(args)
    folder = warm.warm_started(cfg)
    assert Path(folder).name.startswith(f"{qwen_model.name}-memsearcher-seed0-")
    assert "imitates the scripted expert for 4 steps" in capsys.readouterr().out
    record = json.loads((Path(folder) / "warm_start.json").read_text())
    assert "pretrain" not in record and record["settings"]["cold_lr"] == 1e-2
    tokenizer = AutoTokenizer.from_pretrained(qwen_model)
    expert = warm.expert_trajectories(ms.load_questions(few)[:2], local_searcher(cfg.corpus, show_progress=False),
                                      tokenizer, cfg)
    convs = [c for t in expert for c in t["convs"]]
    assert tokenizer.decode(convs[0]["ids"]).startswith(f"<|im_start|>system\n{ms.SYSTEM_PROMPT}<|im_end|>")
    assert expert_nll(folder, convs, cfg) < expert_nll(qwen_model, convs, cfg) - 0.1
    # the command line: the kept cold start is reused, GRPO starts from it and keeps it as the KL reference
    loaded, real_load = [], ms.load_policy
    monkeypatch.setattr(ms, "load_policy", lambda path, device: loaded.append(path) or real_load(path, device))
    monkeypatch.setattr(ms, "trajectory_reward", parity_reward)    # mixed groups: the step moves the weights
    ms.main(args)
    assert "warm start: reusing" in capsys.readouterr().out
    assert loaded == [folder] * 3                         # the damage check, the policy, the reference
    step, = [rec for rec in runs.read_metrics(tmp_path / "run") if "reward" in rec]
    assert step["mixed_groups"] > 0 and step["grad_norm"] > 0 and cfg.kl_coef > 0
    start, end = (load_file(Path(f) / "model.safetensors") for f in [folder, tmp_path / "run" / "checkpoint-000001"])
    assert start.keys() == end.keys() and not all(torch.equal(start[k], end[k]) for k in start)


def test_cold_start_on_data_without_hop_chains_is_refused_before_any_work(tmp_path, monkeypatch):
    """--small imitates the toy world's expert by default: other data is refused at once, saying what to pass,
    before the run folder is taken or the index built (a real corpus can take minutes to index)."""
    path = tmp_path / "nq.jsonl"
    path.write_text('{"id": "nq-1", "question": "who wrote hamlet?", "golden_answers": ["Shakespeare"]}\n')

    def work(*args, **kwargs):
        raise AssertionError("work started before the data was checked")

    monkeypatch.setattr(ms, "local_searcher", work)
    monkeypatch.setattr(ms, "open_run", work)
    with pytest.raises(SystemExit) as stop:
        ms.main(["--small", "--train-file", str(path), "--output-dir", str(tmp_path / "run"),
                 "--warm-start-dir", str(tmp_path / "warm")])
    assert "1 lack it, e.g. nq-1. On other data, pass --warm-steps 0" in str(stop.value.code)
    assert not (tmp_path / "warm").exists()


def test_warm_start_on_data_without_hop_chains_is_refused_before_any_work(tmp_path):
    path = tmp_path / "nq.jsonl"
    path.write_text('{"question": "who wrote hamlet?", "golden_answers": ["Shakespeare"]}\n')
    cfg = tiny_config(tmp_path / "run", train_file=[str(path)])
    start = time.time()
    with pytest.raises(SystemExit, match="--warm-steps needs questions with a 'support' hop chain"):
        warm.tiny_policy(cfg)
    assert time.time() - start < 5 and not (tmp_path / "run" / "warm-start").exists()


@pytest.mark.parametrize("bad_line, problem", [
    (b'{"id": "x", "text": "no contents"}', 'missing or empty "contents"'),
    ('{"id": "x", "contents": "Caf\xe9\\ntext"}'.encode("latin-1"), "not UTF-8"),
    (b"{not json", "invalid JSON"),
])
def test_a_bad_corpus_on_the_tiny_path_is_one_line_before_any_work(tmp_path, bad_line, problem):
    """--tiny builds its tokenizer from the corpus: read by the same reader as everywhere, before the warm start's
    minutes of pretraining and imitation (the --tiny defaults here)."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b'{"id": "a", "contents": "T\\ntext"}\n' + bad_line + b"\n")
    start = time.time()
    with pytest.raises(SystemExit) as stop:
        ms.main(["--tiny", "--corpus", str(corpus), "--output-dir", str(tmp_path / "run"),
                 "--warm-start-dir", str(tmp_path / "warm")])
    first_line = str(stop.value.code).splitlines()[0]
    assert first_line.startswith(f"memsearcher.py: {corpus}:2: {problem}") and "Error" not in first_line
    assert time.time() - start < 10 and not (tmp_path / "warm").exists()


def test_byte_order_marks_are_fine_on_the_tiny_path(tmp_path):
    corpus, train = tmp_path / "corpus.jsonl", tmp_path / "train.jsonl"
    corpus.write_bytes(codecs.BOM_UTF8 + b'{"id": "a", "contents": "Paris\\nParis is in France."}\n')
    train.write_bytes(codecs.BOM_UTF8 + b'{"question": "Where is Paris?", "golden_answers": ["France"]}\n')
    cfg = tiny_config(tmp_path / "run", corpus=str(corpus), train_file=[str(train)], pretrain_steps=0, warm_steps=0)
    assert (Path(warm.tiny_policy(cfg)) / "warm_start.json").exists()
