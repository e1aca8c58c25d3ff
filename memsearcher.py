"""MemSearcher in one file: a search agent that keeps a compact memory, trained with multi-context GRPO.

MemSearcher (arXiv 2511.02805) answers questions by searching, like ReAct or Search-R1, but it does not append
everything it reads to one ever-growing context. Every turn starts a fresh context that holds only the
question and the agent's current memory. In that turn the model thinks, then answers or searches; after a
search it reads the retrieved passages and rewrites its memory, keeping only what helps. The next turn sees
the question and the new memory, so the context stays about the same size however many turns it takes.

A trajectory is therefore several conversations, one per turn. Multi-context GRPO samples G trajectories per
question, scores each one by exact match, normalises the rewards within the group, and applies a trajectory's
advantage to every token the model sampled in every one of its conversations.

Read it top to bottom: config -> prompt template -> memory-updating rollout -> exact-match reward ->
multi-context GRPO loss -> full finetuning -> evaluation -> CLI.

    python memsearcher.py                   # --small when a CUDA GPU is present, --tiny otherwise
    python memsearcher.py --small           # Qwen2.5-0.5B-Instruct from the hub, full finetuning on one GPU
    python memsearcher.py --tiny            # a tiny Qwen2 built offline, taught on the CPU in minutes
    python memsearcher.py --tiny --compare  # MemSearcher vs ReAct: EM, context per turn, cost, throughput
    python memsearcher.py --logprob-memory  # peak memory of chunked log-probs vs full logits
    python memsearcher.py --help            # every setting

Deviations from the official code (icip-cas/MemSearcher, built on verl + vLLM):
 1. Tags: <search>query</search> and <answer>...</answer> (as Search-R1) instead of a JSON <tool_call> and a
    \\boxed{} answer; passages come back inside <information>, and the user message holds the question and
    the memory as <question>...</question> <memory>...</memory>. Nothing is pre-filled: the model writes
    every tag itself.
 2. Reward: exact match (SQuAD normalisation) only; the official training reward is token F1 plus 0.1 for a
    well-formed but wrong answer.
 3. Retrieval: in-memory BM25 over a FlashRAG corpus (retriever.py) instead of an E5 dense-retrieval server.
 4. Rollouts with Hugging Face `generate` on the training model (one GPU or the CPU) instead of vLLM on 8 GPUs.
 5. No entropy bonus (official: 0.001); its estimate is logged instead.
 6. The memory phase reuses the action phase's context but not its KV cache: it is prefilled again.
 7. The default data is a small fictional world (data/make_world.py) so that a run finishes in minutes to an
    hour; the official runs train on NQ + HotpotQA and test on seven benchmarks.
"""
import argparse
import contextlib
import json
import math
import os
import random
import re
import shutil
import string
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import (AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessor,
                          LogitsProcessorList)
from transformers.utils import logging as hf_logging

from retriever import RetrievalError, format_hits, load_corpus, local_searcher, remote_searcher

DATA = Path(__file__).parent / "data"


# -----------------------------------------------------------------------------------------------------------
# Config: one flat block. Every field is a command-line flag (--group-size 5). Presets fill in the rest.

def opt(default, help):
    if isinstance(default, list):                          # a flag that can be given several times
        return field(default_factory=lambda: list(default), metadata={"help": help, "repeat": True})
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # what to train, on what
    model: str = opt("Qwen/Qwen2.5-0.5B-Instruct", "HF causal LM id or local path; 'tiny' builds one offline")
    train_file: list = opt([str(DATA / "train.jsonl")], "training questions, FlashRAG JSONL; repeat the flag "
                                                         "for several files")
    test_file: list = opt([str(DATA / "test.jsonl")], "test questions, FlashRAG JSONL; repeat the flag for "
                                                       "several benchmarks (EM is reported per file)")
    corpus: str = opt(str(DATA / "corpus.jsonl"), "FlashRAG corpus JSONL for BM25")
    retriever_url: str = opt("", "a Search-R1 retrieval server, e.g. http://host:8000/retrieve, instead of "
                                 "BM25 over --corpus")
    output_dir: str = opt("runs/small", "checkpoints, metrics.jsonl and the final model go here")
    seed: int = opt(0, "random seed")
    # multi-context GRPO
    group_size: int = opt(5, "G: rollouts per question")
    questions_per_step: int = opt(32, "questions per training step (trajectories = this x G)")
    steps: int = opt(100, "training steps")
    lr: float = opt(1e-6, "AdamW learning rate (constant)")
    weight_decay: float = opt(0.01, "AdamW weight decay")
    grad_clip: float = opt(1.0, "max gradient norm")
    kl_coef: float = opt(0.001, "weight of the k3 KL to the frozen initial model; 0 loads no reference")
    clip_eps: float = opt(0.2, "PPO clip epsilon")
    dual_clip: float = opt(3.0, "dual-clip constant c: caps the loss of negative-advantage tokens")
    updates_per_step: int = opt(2, "optimizer steps per rollout batch (PPO mini-batches, 1 epoch)")
    micro_batch_tokens: int = opt(16384, "max padded tokens in one forward/backward pass")
    logprob_chunk: int = opt(256, "tokens per chunk when turning hidden states into log-probs (each chunk "
                                  "holds a few [chunk, vocab] fp32 tensors: 256 x 151,936 x 4 B = 156 MB each)")
    # the agent
    workflow: str = opt("memsearcher", "memsearcher: each turn sees question + memory; react: one growing context")
    max_turns: int = opt(5, "max turns per trajectory in training")
    eval_max_turns: int = opt(10, "max turns per trajectory in evaluation")
    max_new_tokens: int = opt(512, "max sampled tokens per generation (action or memory)")
    max_memory_tokens: int = opt(1024, "a longer memory ends the trajectory")
    top_k: int = opt(3, "passages retrieved per search")
    temperature: float = opt(1.0, "sampling temperature in training (evaluation is greedy)")
    # evaluation, logging, checkpoints
    eval_every: int = opt(25, "evaluate every N steps (0: only before and after training)")
    eval_n: int = opt(300, "test questions to evaluate on (0: all)")
    save_every: int = opt(50, "checkpoint every N steps (0: only at the end)")
    print_every: int = opt(10, "print one whole trajectory every N steps")
    resume: bool = opt(False, "continue from the latest checkpoint in --output-dir")
    # measurements instead of training
    compare: bool = opt(False, "evaluate the model with both workflows side by side (no GRPO) and exit")
    compare_turns: int = opt(8, "max turns per trajectory in --compare")
    logprob_memory: bool = opt(False, "measure the peak memory of chunked vs full-logits log-probs and exit")
    # warm start for a model that knows nothing yet (teaching aids for --tiny, not part of the paper)
    pretrain_steps: int = opt(0, "next-token pretraining steps on the corpus and questions (0: none)")
    warm_steps: int = opt(0, "steps imitating a scripted expert before GRPO (0: none); needs 'support' chains")
    warm_batch: int = opt(16, "conversations per imitation step")
    warm_lr: float = opt(1e-3, "learning rate of pretraining (constant) and imitation (peak; cosine decay)")
    expert_forget: float = opt(0.6, "expert: chance that a memory update drops the fact just found, "
                                    "once the memory already holds a fact")
    expert_early: float = opt(0.25, "expert: chance of answering from a memory that lacks the final fact")
    # the tiny model (used when --model tiny)
    tiny_hidden: int = opt(128, "tiny model: hidden size")
    tiny_layers: int = opt(4, "tiny model: transformer layers")
    tiny_vocab: int = opt(4096, "tiny model: BPE vocabulary size (at most)")


PRESETS = {
    # Qwen2.5-0.5B-Instruct, full finetuning, one GPU with 24 GB or more: fp32 master weights and AdamW
    # state (~8 GB), bf16 autocast, gradient checkpointing. 100 steps x 32 questions x G=5.
    "small": dict(),
    # a 0.3M-parameter Qwen2 built from data/ in a second, warm-started, then GRPO: ~9 minutes on 2 CPU cores.
    # 2400 imitation steps (~2.6 passes over the expert's conversations): after 1200, one seed in three still
    # copied names badly and GRPO could not repair it.
    "tiny": dict(model="tiny", output_dir="runs/tiny", tiny_hidden=64, tiny_layers=2, top_k=2, max_new_tokens=64,
                 max_memory_tokens=96, eval_max_turns=5, pretrain_steps=300, warm_steps=2400, warm_batch=8,
                 warm_lr=3e-3, group_size=8, questions_per_step=16, steps=30, lr=3e-4, kl_coef=0.0,
                 updates_per_step=1, micro_batch_tokens=8192, logprob_chunk=1024, eval_every=15, eval_n=300,
                 save_every=0, print_every=10),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="MemSearcher: train a search agent with a compact memory.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--small", action="store_true", help="Qwen2.5-0.5B-Instruct on one GPU")
    preset.add_argument("--tiny", action="store_true", help="tiny offline model on the CPU")
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.metadata.get("repeat"):
            parser.add_argument(flag, action="append", default=None, help=f.metadata["help"])
        elif f.type is bool or isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true", default=None, help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=type(f.default), default=None, help=f.metadata["help"])
    args = parser.parse_args(argv)
    if args.small or args.tiny:
        name = "small" if args.small else "tiny"
    else:
        name = "small" if torch.cuda.is_available() else "tiny"
        print(f"No preset given: using --{name} because "
              f"{'a CUDA GPU is present' if name == 'small' else 'no CUDA GPU was found'}.")
    overrides = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name) is not None}
    defaults = dict(PRESETS[name])
    if overrides.get("model", defaults.get("model")) != "tiny":
        # the tiny preset's pretraining and imitation are for the model it builds, not for --model PATH
        for key in ["pretrain_steps", "warm_steps"]:
            defaults.pop(key, None)
    cfg = Config(**{**defaults, **overrides})
    check_config(cfg)
    return cfg


def check_config(cfg):
    """Refuse settings that cannot work, naming the flag to fix."""
    positive = ["group_size", "questions_per_step", "updates_per_step", "micro_batch_tokens", "logprob_chunk",
                "max_turns", "eval_max_turns", "max_new_tokens", "max_memory_tokens", "top_k", "compare_turns"]
    for name in positive:
        if getattr(cfg, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(cfg, name)})")
    for name in ["steps", "lr", "kl_coef", "clip_eps", "eval_every", "eval_n", "save_every", "print_every",
                 "pretrain_steps", "warm_steps"]:
        if getattr(cfg, name) < 0:
            raise SystemExit(f"--{name.replace('_', '-')} must not be negative (got {getattr(cfg, name)})")
    if cfg.temperature <= 0:
        raise SystemExit("--temperature must be positive (evaluation is already greedy)")
    if cfg.workflow not in WORKFLOWS:
        raise SystemExit(f"--workflow must be one of {', '.join(WORKFLOWS)} (got {cfg.workflow!r})")
    if cfg.workflow == "react" and cfg.warm_steps:
        raise SystemExit("--warm-steps imitates a MemSearcher expert: use it with --workflow memsearcher, "
                         "or set --warm-steps 0")
    for name in ["expert_forget", "expert_early"]:
        if not 0 <= getattr(cfg, name) <= 1:
            raise SystemExit(f"--{name.replace('_', '-')} is a probability: between 0 and 1 (got {getattr(cfg, name)})")
    if cfg.dual_clip <= 1:
        raise SystemExit(f"--dual-clip must be greater than 1 (got {cfg.dual_clip})")
    files = [("train_file", p) for p in cfg.train_file] + [("test_file", p) for p in cfg.test_file]
    if not cfg.retriever_url or cfg.model == "tiny":       # the tiny model learns its tokenizer from the corpus
        files.append(("corpus", cfg.corpus))
    for name, path in files:
        if not Path(path).is_file():
            raise SystemExit(f"--{name.replace('_', '-')}: no such file: {path}")


# -----------------------------------------------------------------------------------------------------------
# Prompt template. Each turn the model sees the system prompt and one user message with the question and its
# current memory. It writes <think>, then <search> or <answer>; after a search the passages are appended in
# <information> and it writes the new <memory>. Rendered with the tokenizer's own chat template.

SYSTEM_PROMPT = (
    "Answer the question with a search engine. Think inside <think> </think>, then either answer inside "
    "<answer> </answer> or search inside <search> </search>. Results appear inside <information> "
    "</information>; then rewrite your memory inside <memory> </memory>, keeping only the facts that help "
    "answer the question."
)
# The ReAct (Search-R1) baseline: the same tags without the memory. Its single conversation keeps every
# action and every retrieved passage, so it needs no memory.
REACT_SYSTEM_PROMPT = (
    "Answer the question with a search engine. Think inside <think> </think>, then either answer inside "
    "<answer> </answer> or search inside <search> </search>. Results appear inside <information> "
    "</information>; then think again and continue."
)
WORKFLOWS = ["memsearcher", "react"]
ACTION_STOPS = ["</search>", "</answer>"]    # generation of an action ends at the first of these
MEMORY_STOPS = ["</memory>"]


def user_message(question, memory):
    """MemSearcher's user message; ReAct's (memory None) holds the question only."""
    if memory is None:
        return f"<question> {question} </question>"
    return f"<question> {question} </question>\n<memory> {memory} </memory>"


def render_prompt(tokenizer, question, memory, workflow="memsearcher"):
    """Token ids of a fresh turn: system prompt + user(question, memory) + the assistant's opening marker."""
    react = workflow == "react"
    messages = [{"role": "system", "content": REACT_SYSTEM_PROMPT if react else SYSTEM_PROMPT},
                {"role": "user", "content": user_message(question, None if react else memory)}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def information_text(hits):
    """What is appended after </search>: the retrieved passages, then the model writes its memory."""
    return f"\n<information>\n{format_hits(hits)}\n</information>\n"


# Parsing what the model wrote. One rule for both phases: an optional <think>...</think>, then exactly one
# block of an expected kind (<search>/<answer> in the action phase, <memory> in the memory phase). Text outside
# the tags is ignored; any other tag before or inside the block makes the output malformed.

TAG = re.compile(r"</?(think|search|answer|memory|information)>")


def parse_block(text, kinds):
    """-> (kind, content) for the first complete block of one of `kinds`, or ("malformed", reason)."""
    closings = [(text.find(f"</{k}>"), k) for k in kinds if f"</{k}>" in text]
    if not closings:
        return "malformed", f"no {' or '.join(f'</{k}>' for k in kinds)}"
    end, kind = min(closings)                    # generation stops here; anything after was never sampled
    start = text.rfind(f"<{kind}>", 0, end)
    if start < 0:
        return "malformed", f"</{kind}> without <{kind}>"
    before, content = text[:start], text[start + len(kind) + 2:end]
    think = re.search(r"<think>(.*?)</think>", before, flags=re.S)
    if think:
        if TAG.search(think.group(1)):
            return "malformed", "tag inside <think>"
        before = before[:think.start()] + before[think.end():]
    elif "<think>" in before:
        return "malformed", "unclosed <think>"
    if TAG.search(before):
        return "malformed", f"unexpected {TAG.search(before).group(0)} before <{kind}>"
    if TAG.search(content):
        return "malformed", f"tag inside <{kind}>"
    content = content.strip()
    if not content and kind != "memory":         # an empty memory is allowed: nothing worth keeping
        return "malformed", f"empty <{kind}>"
    return kind, content


def parse_action(text):
    """('search', query) | ('answer', answer) | ('malformed', reason)"""
    return parse_block(text, ("search", "answer"))


def memory_update(text, tokenizer, max_memory_tokens):
    """The new memory from a memory-phase output -> (memory, None) or (None, stop reason)."""
    kind, content = parse_block(text, ("memory",))
    if kind == "malformed":
        return None, "malformed_memory"
    if len(tokenizer(content, add_special_tokens=False).input_ids) > max_memory_tokens:
        return None, "memory_over_limit"
    return content, None


# -----------------------------------------------------------------------------------------------------------
# Memory-updating rollout. All live trajectories advance together: per turn, ONE batched generate for the
# action phase, ONE batched retrieval, ONE batched generate for the memory phase.
#
# Each turn is recorded as a conversation {"ids", "mask"}: the prompt (mask 0), the sampled action (mask 1),
# the retrieved passages (mask 0) and the sampled memory (mask 1). Sampled ids are kept exactly as sampled;
# only injected text (prompts, passages) is ever tokenized.

STOP_REASONS = ["answered", "malformed_action", "malformed_memory", "action_truncated", "memory_truncated",
                "memory_over_limit", "max_turns"]


def autocast(device):
    """bf16 autocast on CUDA (the weights stay fp32); plain fp32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def stop_index(pieces, eos_ids, ids, stops):
    """Number of sampled tokens up to and including the first EOS or the token that completes a stop string.

    pieces[i] is token i decoded alone. A stop string can end inside a token (e.g. ">\\n"): that token is
    kept whole, as sampled; the text is cut at the stop string later. Returns (n, stopped).
    """
    text = ""
    for i, (token, piece) in enumerate(zip(ids, pieces)):
        if token in eos_ids:
            return i + 1, True
        tail = text[-16:] + piece
        text += piece
        if any(s in tail for s in stops):
            return i + 1, True
    return len(ids), False


class SampleFromSoftmax(LogitsProcessor):
    """Sampling at a temperature, written as a logits processor for greedy decoding.

    It draws each next token from the full softmax(scores / T), with no top-k or top-p cut (transformers'
    do_sample=True would add its default top_k=50), by inverse CDF: one uniform number per row. Then it leaves
    only that token's score finite, so the greedy argmax picks it. The full softmax at T is what GRPO needs:
    token_logprobs computes the log-probs of exactly this distribution. torch.multinomial would be ~15x
    slower on a CPU (see the README), enough to dominate --tiny's rollouts.
    """

    def __init__(self, temperature):
        self.temperature = temperature

    def __call__(self, input_ids, scores):
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)          # [B, V]
        cdf = probs.cumsum(dim=-1)                                                  # [B, V]
        u = torch.rand(len(cdf), 1, device=cdf.device) * cdf[:, -1:]                # [B, 1] in [0, total)
        token = torch.searchsorted(cdf, u, right=True)                              # [B, 1] first cdf > u
        return torch.full_like(scores, -math.inf).scatter_(1, token, 0.0)


@torch.no_grad()
def generate(model, tokenizer, contexts, stops, max_new_tokens, greedy, temperature=1.0):
    """One batched generate over many contexts (lists of ids). Returns per context: (sampled ids, text, stopped)."""
    device = model.device
    pad = tokenizer.pad_token_id
    width = max(len(c) for c in contexts)
    input_ids = torch.full((len(contexts), width), pad, dtype=torch.long)
    attention = torch.zeros((len(contexts), width), dtype=torch.long)
    for i, c in enumerate(contexts):                        # left padding: every row ends where sampling starts
        input_ids[i, width - len(c):] = torch.tensor(c)
        attention[i, width - len(c):] = 1
    with autocast(device):
        sampler = None if greedy else LogitsProcessorList([SampleFromSoftmax(temperature)])
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                             do_sample=False, logits_processor=sampler, max_new_tokens=max_new_tokens,
                             stop_strings=stops or None, tokenizer=tokenizer)
    sampled = out[:, width:].tolist()
    eos_ids = set(model.generation_config.eos_token_id)
    results = []
    for ids in sampled:
        pieces = tokenizer.batch_decode([[t] for t in ids])
        n, stopped = stop_index(pieces, eos_ids, ids, stops)
        ids = ids[:n]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        results.append((ids, text, stopped))
    return results


def new_trajectory(question):
    return {"question": question, "memory": "", "convs": [], "turns": [], "context_tokens": [],
            "processed_tokens": 0, "answer": None, "stop": None, "reward": 0.0}


def append(conv, ids, trained):
    conv["ids"] += ids
    conv["mask"] += [int(trained)] * len(ids)


def rollout(model, tokenizer, search, questions, cfg, greedy=False, max_turns=None, workflow=None,
            generate_fn=generate):
    """Run every question to the end; returns one trajectory dict per question (in order).

    generate_fn has generate()'s signature; --compare passes a scripted policy through it.
    """
    max_turns = max_turns or cfg.max_turns
    workflow = workflow or cfg.workflow
    trajs = [new_trajectory(q) for q in questions]
    bar = tqdm(total=len(trajs), desc="rollout" if not greedy else "eval", leave=False, unit="traj",
               disable=len(trajs) == 1)
    for turn in range(max_turns):
        live = [t for t in trajs if t["stop"] is None]
        if not live:
            break
        for t in live:
            # THE difference between the workflows. MemSearcher: a fresh conversation each turn, holding only
            # the question and the current memory. ReAct: one conversation that keeps growing.
            if workflow == "memsearcher" or turn == 0:
                t["convs"].append({"ids": [], "mask": []})
                prompt = render_prompt(tokenizer, t["question"]["question"], t["memory"], workflow)
                append(t["convs"][-1], prompt, False)
            t["turns"].append({"memory_before": t["memory"]})

        # 1) action phase: think, then <search> or <answer>
        outs = generate_fn(model, tokenizer, [t["convs"][-1]["ids"] for t in live], ACTION_STOPS,
                           cfg.max_new_tokens, greedy, cfg.temperature)
        searching = []
        for t, (ids, text, stopped) in zip(live, outs):
            append(t["convs"][-1], ids, True)
            t["processed_tokens"] += len(t["convs"][-1]["ids"])      # what this generate call attended over
            t["turns"][-1]["action"] = text
            kind, content = parse_action(text)
            if not stopped:
                t["stop"] = "action_truncated"
            elif kind == "answer":
                t["answer"], t["stop"] = content, "answered"
            elif kind == "malformed":
                t["stop"] = "malformed_action"
            elif turn == max_turns - 1:
                t["stop"] = "max_turns"                 # a search on the last turn can no longer be used
            else:
                t["turns"][-1]["query"] = content
                searching.append(t)

        # 2) one batched retrieval for all the turn's queries
        if searching:
            hits = search([t["turns"][-1]["query"] for t in searching], cfg.top_k)
            for t, h in zip(searching, hits):
                t["turns"][-1]["hits"] = h
                append(t["convs"][-1], tokenizer(information_text(h), add_special_tokens=False).input_ids, False)

            # 3) memory phase (MemSearcher) -- ReAct goes straight on to the next action in the same context
            if workflow == "memsearcher":
                outs = generate_fn(model, tokenizer, [t["convs"][-1]["ids"] for t in searching], MEMORY_STOPS,
                                   cfg.max_new_tokens, greedy, cfg.temperature)
                for t, (ids, text, stopped) in zip(searching, outs):
                    append(t["convs"][-1], ids, True)
                    t["processed_tokens"] += len(t["convs"][-1]["ids"])
                    t["turns"][-1]["memory_output"] = text
                    memory, reason = memory_update(text, tokenizer, cfg.max_memory_tokens)
                    if not stopped:
                        t["stop"] = "memory_truncated"
                    elif reason:
                        t["stop"] = reason
                    else:
                        t["memory"] = t["turns"][-1]["memory"] = memory
        for t in live:
            t["context_tokens"].append(len(t["convs"][-1]["ids"]))   # the longest context of this turn
        bar.update(sum(t["stop"] is not None for t in live))
    bar.close()
    for t in trajs:
        t["stop"] = t["stop"] or "max_turns"
        t["reward"] = exact_match(t["answer"], t["question"]["golden_answers"]) if t["answer"] is not None else 0.0
    return trajs


# -----------------------------------------------------------------------------------------------------------
# Reward: exact match after SQuAD normalisation (lowercase, drop punctuation and the articles a/an/the,
# collapse white space), maximised over the gold answers. 1.0 or 0.0, given on the trajectory's final answer.

def normalize_answer(text):
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction, golden_answers):
    return float(any(normalize_answer(prediction) == normalize_answer(g) for g in golden_answers))


# -----------------------------------------------------------------------------------------------------------
# Multi-context GRPO.
#
# 1. Group advantage: question q is rolled out G times; trajectory i gets A_i = (r_i - mean(r)) / (std(r) + eps)
#    over its group (unbiased std, as the official code). Equal rewards -> every A_i = 0: no signal, no NaN.
# 2. Multi-context: A_i is copied to every conversation (turn) of trajectory i, and to every sampled token in
#    it. Each conversation is one training row.
# 3. Token-level PPO-clip against the rollout policy, plus k3 KL to the frozen initial model.

def group_advantages(rewards, group_size):
    """rewards: [Q*G] floats, grouped consecutively -> advantages [Q*G]."""
    r = torch.tensor(rewards, dtype=torch.float32).view(-1, group_size)     # [Q, G]
    if group_size == 1:
        return r.flatten()                                                  # no group to compare with
    mean = r.mean(dim=1, keepdim=True)                                      # [Q, 1]
    std = r.std(dim=1, keepdim=True)                                        # [Q, 1], unbiased
    return ((r - mean) / (std + 1e-6)).flatten()                            # [Q*G]


def conversation_rows(trajs, advantages):
    """Flatten trajectories into training rows: one per conversation, each carrying its trajectory's advantage."""
    return [{"ids": c["ids"], "mask": c["mask"], "adv": float(a)}
            for t, a in zip(trajs, advantages) for c in t["convs"]]


def grpo_loss(logp, old_logp, ref_logp, adv, mask, n_tokens, clip_eps, dual_clip, kl_coef):
    """The multi-context GRPO objective for a micro-batch of conversations (rows).

    logp, old_logp, ref_logp, mask: [B, T]   log-probs of the tokens under the current, rollout and reference
                                             policies; mask = 1 on sampled tokens
    adv:                            [B]      the row's trajectory advantage
    n_tokens: number of mask tokens in the whole mini-batch (over all its micro-batches).

    Averaging: a token-level mean over every sampled token of every conversation in the mini-batch (sum here,
    divided by n_tokens). There is no per-conversation or per-trajectory normalisation, as in the official code:
    a trajectory with more turns contributes more tokens, and the result does not depend on how the rows are
    split into micro-batches.
    """
    a = adv[:, None]                                                        # [B, 1] same for all tokens of a row
    ratio = torch.exp(logp - old_logp)                                      # [B, T] pi / pi_rollout
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)                # [B, T]
    pg = -torch.min(ratio * a, clipped * a)                                 # [B, T] PPO-clip, as a loss
    pg = torch.where(a < 0, torch.min(pg, -dual_clip * a), pg)              # [B, T] dual clip: loss <= c*|A|
    per_token = pg
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        # k3 estimator of KL(pi || pi_ref), unbiased and always >= 0: exp(d) - d - 1 with d = log pi_ref - log pi
        # (http://joschu.net/blog/kl-approx.html)
        d = ref_logp - logp                                                 # [B, T]
        kl = torch.exp(d) - d - 1                                           # [B, T]
        per_token = pg + kl_coef * kl
    loss = (per_token * mask).sum() / n_tokens                              # scalar
    stats = {"clip_frac": (((ratio - 1).abs() > clip_eps).float() * mask).sum().item(),
             "kl": (kl * mask).sum().item()}                                # sums; divided by n_tokens later
    return loss, stats


RECOMPUTE_LOGITS_ABOVE_BYTES = 2**30         # 1 GB of fp32 logits


def token_logprobs(model, ids, attention, mask, chunk, temperature=1.0):
    """log p(ids[b, t] | ids[b, :t]) where mask[b, t] = 1, else 0.   ids, attention, mask: [B, T] -> [B, T] fp32.

    p is softmax(logits / temperature): the distribution the rollout sampled from. Every log-prob the loss uses
    (current, rollout and reference policy) is taken at the sampling temperature, as verl does; at any other
    temperature the policy gradient would be biased and the PPO ratio would compare the wrong distributions.

    A [B, T, V] logits tensor would be huge (16 x 1024 x 151,936 fp32 = 10 GB), and we only need the log-prob
    of one token per position, at the positions we train. So: run the transformer body once, keep the hidden
    states that predict a sampled token ([N, H]), and push them through the output layer `chunk` rows at a
    time. When gradients flow, each chunk is checkpointed, so backward recomputes its [chunk, V] logits
    instead of storing them. The peak is a few [chunk, V] fp32 tensors (logits, softmax, their gradients):
    `python memsearcher.py --logprob-memory` measures it.
    """
    hidden = model.base_model(input_ids=ids, attention_mask=attention, use_cache=False).last_hidden_state
    predicts = mask[:, 1:].bool()                                           # [B, T-1] position t predicts t+1
    h = hidden[:, :-1][predicts]                                            # [N, H]
    targets = ids[:, 1:][predicts]                                          # [N]
    head = model.get_output_embeddings()

    def chunk_logprobs(h_chunk, t_chunk):
        logits = head(h_chunk).float() / temperature                        # [n, V] fp32 for a stable softmax
        return logits.gather(1, t_chunk[:, None]).squeeze(1) - logits.logsumexp(dim=1)   # [n]

    # Checkpoint the chunks only when all the logits at once would be big: recomputing them in backward costs
    # a second pass through the output layer, a waste for the tiny model.
    recompute = torch.is_grad_enabled() and len(targets) * head.out_features * 4 > RECOMPUTE_LOGITS_ABOVE_BYTES
    parts = []
    for i in range(0, len(targets), chunk):
        args = (h[i:i + chunk], targets[i:i + chunk])
        if recompute:
            parts.append(torch.utils.checkpoint.checkpoint(chunk_logprobs, *args, use_reentrant=False))
        else:
            parts.append(chunk_logprobs(*args))
    logp = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)   # [B, T]
    logp[:, 1:][predicts] = torch.cat(parts) if parts else logp.new_zeros(0)
    return logp


# -----------------------------------------------------------------------------------------------------------
# Training: full finetuning. AdamW on fp32 master weights (bf16 autocast and gradient checkpointing on CUDA),
# micro-batches packed by padded tokens, gradient clipping. Checkpoints are written atomically.

def load_policy(path, device):
    """Model (fp32 weights) and tokenizer, through the same Auto classes for a hub id, a checkpoint or --tiny."""
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    except OSError as err:
        raise SystemExit(f"--model {path}: could not load it ({err}). Give a local folder, or a hub id on a "
                         "machine that can reach the hub; --tiny needs neither.") from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")} - {None, tokenizer.unk_token_id}
    # Drop the shipped sampling defaults (Qwen: temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.05):
    # rollouts must sample from the very distribution whose log-probs we train, softmax(logits / temperature),
    # which SampleFromSoftmax does on top of plain greedy decoding.
    model.generation_config = GenerationConfig(do_sample=False, eos_token_id=sorted(eos),
                                               pad_token_id=tokenizer.pad_token_id)
    return model, tokenizer


def pack_micro_batches(rows, max_tokens):
    """Group rows (longest first) so that rows x longest row <= max_tokens in each micro-batch."""
    rows = sorted(rows, key=lambda r: -len(r["ids"]))
    batches, current = [], []
    for row in rows:
        if current and (len(current) + 1) * len(current[0]["ids"]) > max_tokens:
            batches.append(current)
            current = []
        current.append(row)
    return batches + ([current] if current else [])


def collate(rows, pad_id, device):
    """Right-pad rows -> ids, attention, mask [B, T] and adv [B]."""
    width = max(len(r["ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, r in enumerate(rows):
        ids[i, :len(r["ids"])] = torch.tensor(r["ids"])
        attention[i, :len(r["ids"])] = 1
        mask[i, :len(r["mask"])] = torch.tensor(r["mask"], dtype=torch.float32)
    adv = torch.tensor([r.get("adv", 0.0) for r in rows], dtype=torch.float32)
    return ids.to(device), attention.to(device), mask.to(device), adv.to(device)


@torch.no_grad()
def attach_logprobs(model, rows, key, cfg, pad_id):
    """Store each row's per-token log-probs under the model as row[key] (a CPU tensor of the row's length)."""
    model.eval()
    for batch in pack_micro_batches(rows, cfg.micro_batch_tokens):
        ids, attention, mask, _ = collate(batch, pad_id, model.device)
        with autocast(model.device):
            logp = token_logprobs(model, ids, attention, mask, cfg.logprob_chunk, cfg.temperature).cpu()
        for i, r in enumerate(batch):
            r[key] = logp[i, :len(r["ids"])]


def train_on_rows(model, ref_model, optimizer, rows, cfg, pad_id):
    """One rollout batch -> `updates_per_step` optimizer steps (PPO mini-batches, one epoch). Returns stats."""
    # Rows with zero advantage have zero loss and zero gradient when there is no KL term: skip their forward
    # pass. They still count in the token mean below, so the result is exactly the same.
    needs_forward = (lambda r: r["adv"] != 0) if cfg.kl_coef == 0 else (lambda r: True)
    trained = [r for r in rows if needs_forward(r)]
    if ref_model is not None:
        attach_logprobs(ref_model, trained, "ref_logp", cfg, pad_id)
    if cfg.updates_per_step > 1:
        # With several updates per batch, later ones see a policy that has moved: the ratio pi/pi_rollout needs
        # the rollout policy's log-probs, computed once before the first update (the "old" log-probs).
        attach_logprobs(model, trained, "old_logp", cfg, pad_id)
    order = list(range(len(rows)))
    random.shuffle(order)
    minibatches = [[rows[i] for i in order[k::cfg.updates_per_step]] for k in range(cfg.updates_per_step)]
    totals = Counter()
    model.train()
    for minibatch in minibatches:
        n_tokens = max(1, sum(sum(r["mask"]) for r in minibatch))
        optimizer.zero_grad(set_to_none=True)
        for batch in pack_micro_batches([r for r in minibatch if needs_forward(r)], cfg.micro_batch_tokens):
            ids, attention, mask, adv = collate(batch, pad_id, model.device)
            with autocast(model.device):
                logp = token_logprobs(model, ids, attention, mask, cfg.logprob_chunk, cfg.temperature)
            # With one update per batch the policy has not moved since the rollout: old log-probs = current
            # ones (detached), so the ratio is exactly 1 and only its gradient matters.
            old = stack_key(batch, "old_logp", logp) if cfg.updates_per_step > 1 else logp.detach()
            ref = stack_key(batch, "ref_logp", logp) if ref_model is not None else None
            loss, stats = grpo_loss(logp, old, ref, adv, mask, n_tokens, cfg.clip_eps, cfg.dual_clip, cfg.kl_coef)
            loss.backward()
            totals.update(stats)
            totals["neg_logp"] -= (old * mask).sum().item()         # -log pi_rollout of sampled tokens
            totals["n_forward"] += mask.sum().item()
            totals["loss"] += loss.item()
        totals["grad_norm"] += torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
        optimizer.step()
    n_forward = max(1, totals["n_forward"])
    # Means over the tokens that had a forward pass (skipped zero-advantage rows have no ratio and no KL).
    # entropy_proxy: mean -log pi(sampled token). Its expectation is the entropy of the sampling distribution,
    # so it watches for collapse without a [T, V] entropy computation.
    return {"loss": totals["loss"] / cfg.updates_per_step, "kl": totals["kl"] / n_forward,
            "clip_frac": totals["clip_frac"] / n_forward, "grad_norm": totals["grad_norm"] / cfg.updates_per_step,
            "entropy_proxy": totals["neg_logp"] / n_forward if totals["n_forward"] else None}


def stack_key(batch, key, like):
    """Right-padded [B, T] tensor of the rows' stored per-token values, shaped like `like`."""
    out = torch.zeros_like(like)
    for i, r in enumerate(batch):
        out[i, :len(r[key])] = r[key].to(like.device)
    return out


def save_model(model, tokenizer, final, trainer_state=None):
    """save_pretrained into a temporary folder, renamed to `final` when complete: never half a model."""
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if trainer_state is not None:
        torch.save(trainer_state, tmp / "trainer_state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def save_checkpoint(model, tokenizer, optimizer, step, cfg):
    """output_dir/checkpoint-NNNNNN (model, tokenizer, optimizer, RNG states), then the `latest` pointer."""
    out = Path(cfg.output_dir)
    final = save_model(model, tokenizer, out / f"checkpoint-{step:06d}", {
        "step": step, "optimizer": optimizer.state_dict(), "config": asdict(cfg),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}})
    write_atomic(out / "latest", final.name)
    for old in out.glob("checkpoint-*"):                  # keep only the newest checkpoint
        if old != final:
            shutil.rmtree(old)
    return final


def write_atomic(path, text):
    tmp = Path(f"{path}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def latest_checkpoint(output_dir):
    pointer = Path(output_dir) / "latest"
    if not pointer.exists():
        raise SystemExit(f"--resume: no checkpoint in {output_dir} (no 'latest' file there)")
    return Path(output_dir) / pointer.read_text().strip()


def restore_trainer_state(optimizer, checkpoint):
    state = torch.load(Path(checkpoint) / "trainer_state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    return state["step"]


# The tiny model: a byte-level BPE tokenizer trained on data/ (Qwen's pre-tokenizer split, ChatML specials and
# chat template) and a randomly initialised Qwen2, saved to disk so it loads through the same Auto classes.

QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")       # Qwen2Tokenizer's own pre-tokenizer split
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tiny_model(cfg, texts):
    """Train a tokenizer on `texts`, build a random Qwen2 on it, save both -> their folder."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    path = Path(cfg.output_dir) / "tiny-init"
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=cfg.tiny_vocab, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path.mkdir(parents=True, exist_ok=True)
    bpe.model.save(str(path))                             # vocab.json + merges.txt, as Qwen ships them
    special = {"special": True, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False}
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "chat_template": CHATML, "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None, "unk_token": None,
        "model_max_length": 4096,
        "added_tokens_decoder": {str(bpe.token_to_id(s)): {"content": s, **special} for s in SPECIALS}}, indent=1))
    torch.manual_seed(cfg.seed)
    model = small_qwen2(bpe.get_vocab_size(), cfg.tiny_hidden, cfg.tiny_layers, bos_token_id=None,
                        eos_token_id=bpe.token_to_id("<|im_end|>"), pad_token_id=bpe.token_to_id("<|endoftext|>"))
    model.save_pretrained(path)
    return str(path)


def qwen25_05b_shaped(layers=24):
    """Qwen2.5-0.5B's exact shape with random weights, built offline (no hub): 24 layers of hidden 896, 14 heads
    sharing 2 key/value heads, MLP 4864, the 151,936-token vocabulary, tied embeddings, rope theta 1e6.
    `layers` cuts it down for tests and measurements on a CPU."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
        rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645))


def small_qwen2(vocab, hidden, layers, **special_ids):
    """A randomly initialised Qwen2 (4 attention heads sharing 2 key/value heads, tied embeddings)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=4 * hidden, max_position_embeddings=4096,
        tie_word_embeddings=True, **special_ids))


def tiny_tokenizer_texts(corpus_file, question_files):
    """What the tiny tokenizer learns its merges from: the corpus, the questions and the prompt's words."""
    texts = [SYSTEM_PROMPT, user_message("", ""), information_text([]), EXPERT_SEARCH, EXPERT_ANSWER,
             EXPERT_MEMORY] * 50
    texts += [json.loads(line)["contents"] for line in open(corpus_file, encoding="utf-8") if line.strip()]
    for f in question_files:
        texts += [json.loads(line)["question"] for line in open(f, encoding="utf-8") if line.strip()]
    return texts


# -----------------------------------------------------------------------------------------------------------
# Warm start for --tiny (teaching aids, not part of the paper).
#
# A randomly initialised model never produces a well-formed search, so every reward is 0 and GRPO has nothing
# to reinforce. Two short phases give it what Qwen2.5-Instruct already brings:
#  1. pretraining: next-token prediction on the world's text, so it learns to read and copy names;
#  2. imitation of an imperfect expert. The toy world knows each question's hop chain, so a scripted expert
#     can play the MemSearcher format perfectly: search the next hop, copy the fact it finds into memory,
#     answer when memory holds the answer. It is made imperfect on purpose, with two mistakes drawn at random:
#       - forget (a memory mistake): once the memory already holds a fact, an update drops the fact just
#         found, so the agent searches the same thing again and, with few turns, never gets to answer;
#       - answer early: with the final fact still missing, it answers with what the last hop found (the city
#         instead of its country: the wrong field).
#     The model imitates it by cross-entropy on exactly the tokens RL trains (the loss mask), to convergence.
# The imitator then samples good and bad trajectories for the same question, which is what GRPO needs, while
# greedy decoding follows the expert's more likely choice: it forgets, as the expert does 60% of the time.

def pretrain(model, tokenizer, corpus_file, questions, cfg, batch=16, length=256):
    """Next-token prediction on the world's text: passages (rendered as the agent sees them) and questions.

    A real LLM arrives pretrained: it can read and copy names before it ever searches. The tiny model starts
    from random weights, and imitation alone (whose loss sees only the tokens the agent writes) is slow to
    teach it to copy a name it has read. A minute and a half of ordinary language modelling, where every
    token is a target, fixes that.
    """
    rng = random.Random(cfg.seed)
    texts = [format_hits([p]) for p in load_corpus(corpus_file)] + [q["question"] for q in questions]
    rng.shuffle(texts)
    stream = [t for ids in tokenizer([t + "\n" for t in texts], add_special_tokens=False).input_ids for t in ids]
    chunks = [stream[i:i + length] for i in range(0, len(stream) - length + 1, length)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.warm_lr, weight_decay=0.0)
    model.train()
    losses = []
    bar = tqdm(range(cfg.pretrain_steps), desc="pretrain", unit="step")
    for _ in bar:
        rows = [{"ids": ids, "mask": [0] + [1] * (len(ids) - 1)} for ids in rng.sample(chunks, batch)]
        ids, attention, mask, _ = collate(rows, tokenizer.pad_token_id, model.device)
        with autocast(model.device):
            logp = token_logprobs(model, ids, attention, mask, cfg.logprob_chunk)
        loss = -(logp * mask).sum() / mask.sum()                    # every token is a target here
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    return {"loss_end": sum(losses[-20:]) / len(losses[-20:])}


def warmup_cosine(optimizer, steps, warmup=20):
    """Learning rate: linear warm-up over `warmup` steps, then cosine decay to 0 at `steps`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))


# Spaces inside the tags keep names as the same tokens as in the question and passages (" Ilvo", not "Ilvo").
EXPERT_SEARCH = "<think> I need {0}. </think>\n<search> {0} </search>"
EXPERT_ANSWER = "<think> I can answer. </think>\n<answer> {} </answer>"
EXPERT_MEMORY = "<memory> {} </memory>"


def expert_trajectory(question, search, tokenizer, cfg, rng):
    """Play one question with the scripted expert; returns a trajectory in the same format as rollout()."""
    t = new_trajectory(question)
    support = question["support"]
    for turn in range(cfg.max_turns):
        conv = {"ids": [], "mask": []}
        t["convs"].append(conv)
        append(conv, render_prompt(tokenizer, question["question"], t["memory"]), False)
        known = [h for h in support if h["fact"] in t["memory"]]
        missing = [h for h in support if h["fact"] not in t["memory"]]
        if not missing or (known and rng.random() < cfg.expert_early):
            t["answer"] = question["golden_answers"][0] if not missing else known[-1]["finding"]
            append(conv, tokenizer(EXPERT_ANSWER.format(t["answer"]), add_special_tokens=False).input_ids, True)
            t["stop"] = "answered"
            break
        hop = missing[0]
        append(conv, tokenizer(EXPERT_SEARCH.format(hop["query"]), add_special_tokens=False).input_ids, True)
        if turn == cfg.max_turns - 1:
            t["stop"] = "max_turns"
            break
        hits = search([hop["query"]], cfg.top_k)[0]
        append(conv, tokenizer(information_text(hits), add_special_tokens=False).input_ids, False)
        if not (t["memory"] and rng.random() < cfg.expert_forget):
            t["memory"] = f"{t['memory']} {hop['fact']}".strip()
        append(conv, tokenizer(EXPERT_MEMORY.format(t["memory"]), add_special_tokens=False).input_ids, True)
    t["stop"] = t["stop"] or "max_turns"
    t["reward"] = exact_match(t["answer"], question["golden_answers"]) if t["answer"] is not None else 0.0
    return t


def warm_start(model, tokenizer, search, questions, cfg):
    """Imitation learning on expert trajectories: token-level cross-entropy on the loss-mask tokens."""
    missing = [q["id"] for q in questions if "support" not in q]
    if missing:
        raise SystemExit(f"--warm-steps needs questions with a 'support' hop chain (as data/make_world.py "
                         f"writes); {len(missing)} lack it, e.g. {missing[0]}. Use --warm-steps 0.")
    rng = random.Random(cfg.seed)
    experts = [expert_trajectory(q, search, tokenizer, cfg, rng) for q in tqdm(questions, desc="expert", leave=False)]
    rows = [c for t in experts for c in t["convs"]]
    flawed = sum(t["reward"] == 0 for t in experts) / len(experts)
    print(f"warm start: {len(experts)} expert trajectories ({flawed:.0%} end without the right answer), "
          f"{len(rows)} conversations")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.warm_lr, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, cfg.warm_steps)
    model.train()
    order, losses = [], []
    bar = tqdm(range(cfg.warm_steps), desc="warm start", unit="step")
    for _ in bar:
        if len(order) < cfg.warm_batch:
            order += rng.sample(range(len(rows)), len(rows))          # another shuffled pass over the data
        batch, order = [rows[i] for i in order[:cfg.warm_batch]], order[cfg.warm_batch:]
        n_tokens = sum(sum(r["mask"]) for r in batch)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in pack_micro_batches(batch, cfg.micro_batch_tokens):
            ids, attention, mask, _ = collate(micro, tokenizer.pad_token_id, model.device)
            with autocast(model.device):
                logp = token_logprobs(model, ids, attention, mask, cfg.logprob_chunk)
            loss = -(logp * mask).sum() / n_tokens                  # mean negative log-likelihood per token
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        schedule.step()
        losses.append(total)
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
    return {"expert_flawed": flawed, "loss_end": sum(losses[-20:]) / len(losses[-20:]),
            "loss_every_10_steps": [round(sum(losses[i:i + 10]) / len(losses[i:i + 10]), 4)
                                    for i in range(0, len(losses), 10)]}


# -----------------------------------------------------------------------------------------------------------
# Evaluation: greedy rollouts on test questions. EM overall and per question type, turns, context tokens per
# turn, stop reasons.

# The paper's table: EM per benchmark, in this order, then the average over benchmarks. A test file is named
# by its folder when the file name is only a split (FlashRAG ships nq/test.jsonl, hotpotqa/dev.jsonl, ...).
PAPER_BENCHMARKS = {"nq": "NQ", "triviaqa": "TriviaQA", "popqa": "PopQA", "hotpotqa": "HotpotQA",
                    "2wikimultihopqa": "2Wiki", "2wiki": "2Wiki", "musique": "MuSiQue", "bamboogle": "Bamboogle"}


def benchmark_name(path):
    """'data/nq/test.jsonl' -> 'NQ'; 'my_questions.jsonl' -> 'my_questions'."""
    path = Path(path)
    name = path.parent.name if path.stem.lower() in {"train", "dev", "test", "val", "validation"} else path.stem
    key = re.sub(r"[_\-.](train|dev|test|val|validation)$", "", name.lower())
    return PAPER_BENCHMARKS.get(key, name)


def load_questions(path):
    """FlashRAG question JSONL -> list of dicts; a bad line stops with file:line and what to fix.

    Each question is tagged with its benchmark ("source", from the file's name) for per-benchmark EM.
    """
    questions, first_line_of = [], {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{where}: not UTF-8 ({err.reason} at byte {err.start})") from err
            if not line.strip():
                continue
            try:
                q = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: invalid JSON ({err.msg})") from err
            if not isinstance(q, dict) or not isinstance(q.get("question"), str) or not q["question"].strip():
                raise ValueError(f"{where}: each line needs a non-empty string field \"question\"")
            gold = q.get("golden_answers")
            if not isinstance(gold, list) or not gold or not all(isinstance(g, str) for g in gold):
                raise ValueError(f"{where}: \"golden_answers\" must be a non-empty list of strings")
            q.setdefault("id", where)
            if q["id"] in first_line_of:
                raise ValueError(f"{where}: duplicate id {q['id']!r} (first on line {first_line_of[q['id']]})")
            first_line_of[q["id"]] = lineno
            q["source"] = benchmark_name(path)
            questions.append(q)
    if not questions:
        raise ValueError(f"{path}: no questions in the file")
    return questions


def memory_keeping(trajs):
    """Share of memory updates that keep what the search just found.

    An update counts when the passages it read include one of the question's supporting passages (toy-world
    questions list them); it keeps the fact when the new memory contains that hop's finding (the city, the
    name, ...). None when no question has supporting passages.
    """
    kept = updates = 0
    for t in trajs:
        support = {h["doc_id"]: h["finding"] for h in t["question"].get("support", [])}
        for turn in t["turns"]:
            found = [support[h["id"]] for h in turn.get("hits", []) if h["id"] in support]
            if found and "memory_output" in turn:
                updates += 1
                memory = normalize_answer(turn.get("memory", ""))
                kept += all(normalize_answer(f) in memory for f in found)
    return kept / updates if updates else None


def summarize(trajs):
    """Metrics of a batch of finished trajectories."""
    n = len(trajs)
    per_type, per_source = defaultdict(list), defaultdict(list)
    for t in trajs:
        per_type[t["question"].get("type", "all")].append(t["reward"])
        per_source[t["question"].get("source", "all")].append(t["reward"])
    max_turns = max(len(t["context_tokens"]) for t in trajs)
    context = [[t["context_tokens"][i] for t in trajs if len(t["context_tokens"]) > i] for i in range(max_turns)]
    sampled = [sum(sum(c["mask"]) for c in t["convs"]) for t in trajs]
    return {"em": sum(t["reward"] for t in trajs) / n,
            "em_by_type": {k: sum(v) / len(v) for k, v in sorted(per_type.items())},
            "em_by_benchmark": {k: sum(v) / len(v) for k, v in per_source.items()},
            "turns": sum(len(t["turns"]) for t in trajs) / n,
            "context_tokens_per_turn": [round(sum(c) / len(c), 1) for c in context],
            "sampled_tokens": sum(sampled) / n,
            "answered": sum(t["answer"] is not None for t in trajs) / n,
            "memory_keeping": memory_keeping(trajs),
            "stops": dict(Counter(t["stop"] for t in trajs))}


def evaluate(model, tokenizer, search, questions, cfg):
    model.eval()
    trajs = rollout(model, tokenizer, search, questions, cfg, greedy=True, max_turns=cfg.eval_max_turns)
    return summarize(trajs), trajs


def benchmark_table(em_by_benchmark):
    """EM per benchmark in the paper's column order (others after, in file order), and their average."""
    order = list(dict.fromkeys(PAPER_BENCHMARKS.values()))
    names = sorted(em_by_benchmark, key=lambda k: order.index(k) if k in order else len(order))
    cells = [(k, em_by_benchmark[k]) for k in names]
    cells.append(("Avg", sum(em_by_benchmark.values()) / len(em_by_benchmark)))
    width = max(9, *(len(k) + 2 for k, _ in cells))
    return "".join(f"{k:>{width}}" for k, _ in cells) + "\n" + "".join(f"{v:>{width}.3f}" for _, v in cells)


def format_trajectory(t):
    """A whole trajectory, memory turn by turn, for the log."""
    q = t["question"]
    lines = [f"Q: {q['question']}   gold: {q['golden_answers']}"]
    for i, turn in enumerate(t["turns"], 1):
        lines.append(f"  turn {i} | memory: {turn['memory_before'] or '(empty)'}")
        lines.append(f"         | action: {turn.get('action', '').strip()}")
        if "hits" in turn:
            lines.append(f"         | found:  {' / '.join(h['title'] for h in turn['hits'])}")
        if "memory_output" in turn:
            lines.append(f"         | wrote:  {turn['memory_output'].strip()}")
    lines.append(f"  -> {t['stop']}, answer {t['answer']!r}, reward {t['reward']}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------------------------------------
# MemSearcher vs ReAct (--compare). The paper's trade-off, measured: the same policy, the same test questions,
# both workflows. ReAct keeps every turn in one context, so its context and its cost grow with the turns;
# MemSearcher's context holds the question and the memory only, so it stays flat.

def scripted_policy(questions, searches):
    """A stand-in for the model with generate()'s signature, for measuring context lengths on any machine.

    It knows each toy-world question's hop chain: it searches `searches` times, walking the chain again from
    the start when it runs out of hops, and then answers with the gold answer. Its memory holds every
    supporting fact it has read. Its texts are tokenized (they were never sampled), so it measures lengths,
    not learning.
    """
    by_text = {q["question"]: q for q in questions}
    calls = Counter()                                      # action phases so far, per question

    def generate_fn(model, tokenizer, contexts, stops, max_new_tokens, greedy, temperature=1.0):
        outs = []
        for context in contexts:
            text = tokenizer.decode(context)
            q = by_text[re.findall(r"<question> (.*?) </question>", text)[-1]]
            if stops == MEMORY_STOPS:
                facts = [h["fact"] for h in q["support"] if h["fact"] in text]
                out = EXPERT_MEMORY.format(" ".join(dict.fromkeys(facts)))
            else:
                calls[q["question"]] += 1
                n = calls[q["question"]]
                out = (EXPERT_SEARCH.format(q["support"][(n - 1) % len(q["support"])]["query"]) if n <= searches
                       else EXPERT_ANSWER.format(q["golden_answers"][0]))
            outs.append((tokenizer(out, add_special_tokens=False).input_ids, out, True))
        return outs
    return generate_fn


def peak_memory_mb(device):
    """CUDA: peak allocated since the last reset. CPU: the process's peak resident set so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024       # Linux reports KiB


def workflow_metrics(trajs, seconds, device):
    """What the comparison table shows for one workflow."""
    m = summarize(trajs)
    turns = max(len(t["context_tokens"]) for t in trajs)
    return {"em": m["em"], "turns": m["turns"],
            "context_mean": m["context_tokens_per_turn"],
            "context_max": [max(t["context_tokens"][i] for t in trajs if len(t["context_tokens"]) > i)
                            for i in range(turns)],
            "processed_tokens": sum(t["processed_tokens"] for t in trajs) / len(trajs),
            "sampled_tokens": m["sampled_tokens"], "generation_s": round(seconds, 2),
            "peak_memory_mb": round(peak_memory_mb(device), 1), "stops": m["stops"]}


def compare_workflows(model, tokenizer, search, questions, cfg, scripted_searches=None):
    """Greedy rollouts of the same questions with both workflows -> {workflow: metrics}.

    With scripted_searches, the scripted policy plays instead of the model (the model is not used)."""
    results = {}
    for workflow in WORKFLOWS:
        if model.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        fn = scripted_policy(questions, scripted_searches) if scripted_searches else generate
        t0 = time.time()
        trajs = rollout(model, tokenizer, search, questions, cfg, greedy=True, max_turns=cfg.compare_turns,
                        workflow=workflow, generate_fn=fn)
        results[workflow] = workflow_metrics(trajs, time.time() - t0, model.device)
    return results


def rollout_throughput(model, tokenizer, search, questions, cfg):
    """Sampled tokens/s of one batched training rollout (sampling, as in training) vs one trajectory at a time."""
    model.eval()
    rates = {}
    for mode in ["batched", "one at a time"]:
        torch.manual_seed(cfg.seed)
        t0 = time.time()
        if mode == "batched":
            trajs = rollout(model, tokenizer, search, questions, cfg)
        else:
            trajs = [t for q in questions for t in rollout(model, tokenizer, search, [q], cfg)]
        seconds = time.time() - t0
        tokens = sum(sum(c["mask"]) for t in trajs for c in t["convs"])
        rates[mode] = {"trajectories": len(trajs), "sampled_tokens": tokens, "seconds": round(seconds, 2),
                       "tokens_per_s": round(tokens / seconds, 1)}
    rates["speedup"] = round(rates["batched"]["tokens_per_s"] / rates["one at a time"]["tokens_per_s"], 2)
    return rates


def compare(cfg):
    """--compare: evaluate both workflows (model and scripted policy), measure rollout throughput, report."""
    device, out, train_qs, test_qs, search = setup(cfg)
    model, tokenizer, _ = prepare_policy(cfg, device, train_qs, search)
    model.eval()
    results = {"model": cfg.model, "device": str(device), "questions": len(test_qs), "max_turns": cfg.compare_turns,
               "policies": {"model (greedy)": compare_workflows(model, tokenizer, search, test_qs, cfg)}}
    if all("support" in q for q in test_qs):
        results["policies"]["scripted (searches until the last turn)"] = compare_workflows(
            model, tokenizer, search, test_qs, cfg, scripted_searches=cfg.compare_turns - 1)
    batch = [q for q in train_qs[:cfg.questions_per_step] for _ in range(cfg.group_size)]   # one training batch
    results["throughput"] = rollout_throughput(model, tokenizer, search, batch, cfg)
    (out / "compare.json").write_text(json.dumps(results, indent=1))
    print_comparison(results)
    print(f"written: {out / 'compare.json'}")
    plot_context(results, out / "context_per_turn.png")
    return results


def print_comparison(r):
    print(f"\nMemSearcher vs ReAct: {r['questions']} test questions, up to {r['max_turns']} turns, {r['model']} "
          f"on {r['device']}")
    for policy, results in r["policies"].items():
        print(f"\n{policy}")
        rows = [("EM", "{em:.3f}"), ("mean turns", "{turns:.2f}"), ("tokens processed / trajectory",
                "{processed_tokens:.0f}"), ("generation seconds", "{generation_s:.1f}"),
                ("peak memory MB", "{peak_memory_mb:.0f}")]
        print(f"{'':34}" + "".join(f"{w:>14}" for w in results))
        for label, f in rows:
            print(f"{label:34}" + "".join(f"{f.format(**m):>14}" for m in results.values()))
        turns = max(len(m["context_mean"]) for m in results.values())
        for i in range(turns):
            cells = [f"{m['context_mean'][i]:.0f} / {m['context_max'][i]}" if i < len(m["context_mean"]) else "-"
                     for m in results.values()]
            print(f"{f'context at turn {i + 1} (mean / max)':34}" + "".join(f"{c:>14}" for c in cells))
    if r["device"] == "cpu":
        print("(on a CPU, peak memory is the process's peak resident set so far: a later column is never below "
              "an earlier one)")
    t = r["throughput"]
    print(f"\nrollout throughput, {t['batched']['trajectories']} trajectories sampled as in training: batched "
          f"{t['batched']['tokens_per_s']:.0f} tokens/s, one trajectory at a time "
          f"{t['one at a time']['tokens_per_s']:.0f} tokens/s ({t['speedup']:.1f}x)")


def pyplot_or_none(path, note=""):
    """matplotlib.pyplot for writing PNGs, or None (with a hint) when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print(f"(pip install matplotlib to get {path}{note})")
        return None


def plot_context(r, path):
    """Context tokens per turn for both workflows -> PNG (needs matplotlib)."""
    plt = pyplot_or_none(path)
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(r["policies"]), figsize=(5 * len(r["policies"]), 3.5), squeeze=False)
    for ax, (policy, results) in zip(axes[0], r["policies"].items()):
        for workflow, m in results.items():
            ax.plot(range(1, len(m["context_mean"]) + 1), m["context_mean"], marker="o", label=workflow)
        ax.set(title=policy, xlabel="turn", ylabel="context tokens (mean)", ylim=(0, None))
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


def logprob_memory(cfg, rows=16, length=1024, vocab=151_936):
    """--logprob-memory: peak memory that log-probs + backward add over rows x length tokens with Qwen's vocab.

    A two-layer Qwen2 with hidden size 64 and Qwen2.5's 151,936-token vocabulary stands in for the model: the
    output layer is what matters. Chunked = token_logprobs(); full = the usual logits.log_softmax().gather(),
    which holds several [B, T, V] fp32 tensors at once. On a CPU each measurement runs in a fresh process (peak
    resident memory can only grow); full logits are measured at 1 and 2 rows and scaled to `rows`, because at
    16 x 1024 they need tens of GB.
    """
    import multiprocessing
    results = {}
    for method, n in [("chunked", rows), ("full logits", 1), ("full logits", 2)]:
        if torch.cuda.is_available():
            added = _logprob_peak(method, n, length, vocab, cfg.logprob_chunk)
        else:
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                added = pool.apply(_logprob_peak, (method, n, length, vocab, cfg.logprob_chunk))
        results[f"{method}, {n} x {length}"] = round(added)
        print(f"{method:12} {n:3} x {length} tokens: +{added:,.0f} MB peak")
    per_row = results[f"full logits, 2 x {length}"] - results[f"full logits, 1 x {length}"]
    results[f"full logits, {rows} x {length} (scaled)"] = round(results[f"full logits, 1 x {length}"]
                                                                 + (rows - 1) * per_row)
    print(f"full logits  {rows} x {length} tokens: ~+{results[f'full logits, {rows} x {length} (scaled)']:,} MB "
          f"(scaled from 1 and 2 rows: {per_row:,.0f} MB per row)")
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.output_dir) / "logprob_memory.json").write_text(json.dumps(results, indent=1))
    return results


def _logprob_peak(method, rows, length, vocab, chunk):
    """Peak MB added by one forward + backward of the summed log-probs (runs in its own process on a CPU)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = small_qwen2(vocab, hidden=64, layers=2).to(device)
    ids = torch.randint(vocab, (rows, length), device=device)
    attention, mask = torch.ones_like(ids), torch.ones(rows, length, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() / 2**20 if device.type == "cuda" else peak_memory_mb(device)
    if method == "chunked":
        logp = token_logprobs(model, ids, attention, mask, chunk)
    else:
        logits = model(input_ids=ids, attention_mask=attention).logits.float()            # [B, T, V]
        logp = logits[:, :-1].log_softmax(-1).gather(2, ids[:, 1:, None]).squeeze(2)      # [B, T-1]
    logp.sum().backward()
    return peak_memory_mb(device) - before


# -----------------------------------------------------------------------------------------------------------
# CLI: build or load the model, train with multi-context GRPO, evaluate, save.

def log_metrics(cfg, record):
    with open(Path(cfg.output_dir) / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def setup(cfg):
    """Seeds, device, output folder, questions and the search engine shared by every command."""
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.resume and (out / "metrics.jsonl").exists():       # a new run: keep the old log, start a new one
        old = out / f"metrics.{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        os.replace(out / "metrics.jsonl", old)
        print(f"{out / 'metrics.jsonl'} is from an earlier run: moved to {old}")
    train_qs = [q for path in cfg.train_file for q in load_questions(path)]
    test_qs = [q for path in cfg.test_file for q in load_questions(path)[:cfg.eval_n or None]]   # per file
    search = remote_searcher(cfg.retriever_url) if cfg.retriever_url else local_searcher(cfg.corpus)
    return device, out, train_qs, test_qs, search


def prepare_policy(cfg, device, train_qs, search):
    """The policy GRPO starts from -> (model, tokenizer, where it can be reloaded from, for the KL reference).

    --model tiny builds a random one here; --pretrain-steps and --warm-steps (the teaching aids) then train
    it, and the result is saved to output_dir/initial.
    """
    path = build_tiny_model(cfg, tiny_tokenizer_texts(cfg.corpus, cfg.train_file)) if cfg.model == "tiny" \
        else cfg.model
    model, tokenizer = load_policy(path, device)
    print(f"model {cfg.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters on {device}")
    if not (cfg.pretrain_steps or cfg.warm_steps):
        return model, tokenizer, path
    if cfg.pretrain_steps:
        log_metrics(cfg, {"step": 0, "pretrain": pretrain(model, tokenizer, cfg.corpus, train_qs, cfg)})
    if cfg.warm_steps:
        log_metrics(cfg, {"step": 0, "warm_start": warm_start(model, tokenizer, search, train_qs, cfg)})
    initial = save_model(model, tokenizer, Path(cfg.output_dir) / "initial")
    return model, tokenizer, str(initial)


def train(cfg):
    device, out, train_qs, test_qs, search = setup(cfg)
    start = 0
    if cfg.resume:
        checkpoint = latest_checkpoint(cfg.output_dir)
        model, tokenizer = load_policy(str(checkpoint), device)
        initial = next((str(p) for p in [out / "initial", out / "tiny-init"] if p.is_dir()), cfg.model)
    else:
        model, tokenizer, initial = prepare_policy(cfg, device, train_qs, search)
    ref_model = None
    if cfg.kl_coef > 0:
        ref_model, _ = load_policy(initial, device)        # the frozen policy GRPO started from
        ref_model.requires_grad_(False).eval()
        if device.type == "cuda":
            ref_model.to(torch.bfloat16)
    if device.type == "cuda":
        model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.resume:
        start = restore_trainer_state(optimizer, checkpoint)
        print(f"resumed from {checkpoint} at step {start}")

    def run_eval(step):
        t0 = time.time()
        metrics, trajs = evaluate(model, tokenizer, search, test_qs, cfg)
        log_metrics(cfg, {"step": step, "eval": metrics, "eval_s": round(time.time() - t0, 1)})
        keeping = metrics["memory_keeping"]
        tqdm.write(f"[eval step {step}] EM {metrics['em']:.3f}  by type {fmt(metrics['em_by_type'])}  "
                   f"turns {metrics['turns']:.2f}  memory keeping {'-' if keeping is None else f'{keeping:.3f}'}"
                   f"  stops {metrics['stops']}")
        if len(cfg.test_file) > 1:
            tqdm.write(benchmark_table(metrics["em_by_benchmark"]))
        return metrics, trajs

    before = run_eval(0) if start == 0 else None
    bar = tqdm(range(start, cfg.steps), desc="train", unit="step", initial=start, total=cfg.steps)
    done = start                                           # optimizer steps taken so far
    try:
        for step in bar:
            t0 = time.time()
            batch = random.sample(train_qs, min(cfg.questions_per_step, len(train_qs)))
            questions = [q for q in batch for _ in range(cfg.group_size)]          # G copies, consecutively
            model.eval()
            trajs = rollout(model, tokenizer, search, questions, cfg)
            t_rollout = time.time() - t0
            rewards = [t["reward"] for t in trajs]
            advantages = group_advantages(rewards, cfg.group_size)
            rows = conversation_rows(trajs, advantages)
            stats = train_on_rows(model, ref_model, optimizer, rows, cfg, tokenizer.pad_token_id)
            done = step + 1
            groups = torch.tensor(rewards).view(-1, cfg.group_size)
            metrics = summarize(trajs)
            record = {"step": step + 1, "reward": sum(rewards) / len(rewards),
                      "mixed_groups": (groups.max(1).values != groups.min(1).values).float().mean().item(),
                      **stats, **{k: metrics[k] for k in ["turns", "sampled_tokens", "answered", "stops"]},
                      "context_tokens_per_turn": metrics["context_tokens_per_turn"],
                      "rollout_s": round(t_rollout, 2), "step_s": round(time.time() - t0, 2),
                      "sampled_tokens_per_s": round(metrics["sampled_tokens"] * len(trajs) / t_rollout, 1)}
            log_metrics(cfg, record)
            bar.set_postfix(reward=f"{record['reward']:.3f}", mixed=f"{record['mixed_groups']:.2f}")
            if cfg.print_every and (step + 1) % cfg.print_every == 0:
                tqdm.write(f"[step {step + 1}] " + format_trajectory(trajs[0]))
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                run_eval(step + 1)
            if cfg.save_every and (step + 1) % cfg.save_every == 0:
                save_checkpoint(model, tokenizer, optimizer, step + 1, cfg)
    except RetrievalError as err:
        # A retrieval server that stays down must not cost the run: keep what was learned, say how to go on.
        path = save_checkpoint(model, tokenizer, optimizer, done, cfg)
        raise SystemExit(f"{err}\nStopped: saved {path} after {done} steps. When the server is back, rerun the "
                         "same command with --resume.") from err
    path = save_checkpoint(model, tokenizer, optimizer, cfg.steps, cfg)
    after = run_eval(cfg.steps)
    print(f"saved {path}; metrics in {out / 'metrics.jsonl'}")
    report(before, after)
    plot_curves(out)
    return after[0]


def report(before, after):
    """EM per question type and memory keeping before and after GRPO, and one test question both times."""
    (m1, t1), (m2, t2) = before or (None, None), after
    if before:
        print(f"\n{'':24}{'before GRPO':>12}{'after GRPO':>12}")
        for k in m2["em_by_type"]:
            print(f"{'EM ' + k:24}{m1['em_by_type'][k]:12.3f}{m2['em_by_type'][k]:12.3f}")
        print(f"{'EM all':24}{m1['em']:12.3f}{m2['em']:12.3f}")
        if m2["memory_keeping"] is not None:
            print(f"{'memory keeping':24}{m1['memory_keeping']:12.3f}{m2['memory_keeping']:12.3f}")
    multi_hop = [i for i, t in enumerate(t2) if len(t["question"].get("support", [])) > 1]
    i = multi_hop[0] if multi_hop else 0
    if before:
        print("\nA test question before GRPO:\n" + format_trajectory(t1[i]))
    print("\nA test question after GRPO:\n" + format_trajectory(t2[i]))


def plot_curves(out):
    """Reward per step and EM per evaluation -> out/curves.png (needs matplotlib)."""
    plt = pyplot_or_none(out / "curves.png", "; the numbers are in metrics.jsonl")
    if plt is None:
        return
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train_steps = [(r["step"], r["reward"]) for r in records if "reward" in r]
    evals = [(r["step"], r["eval"]["em"]) for r in records if "eval" in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    if train_steps:
        axes[0].plot(*zip(*train_steps))
    axes[0].set(title="training reward (mean EM of sampled trajectories)", xlabel="GRPO step")
    axes[1].plot(*zip(*evals), marker="o")
    axes[1].set(title="greedy test EM", xlabel="GRPO step", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    print(f"plots: {out / 'curves.png'}")


def fmt(d):
    return "{" + ", ".join(f"{k}: {v:.3f}" for k, v in d.items()) + "}"


def main(argv=None):
    cfg = parse_args(argv)
    if cfg.logprob_memory:
        logprob_memory(cfg)
    elif cfg.compare:
        compare(cfg)
    else:
        train(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
