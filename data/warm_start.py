"""Warm starts on the toy world: a teaching aid for `python memsearcher.py --tiny` and --small, not part of the paper.

A model that never writes a well-formed search gets every reward 0, and GRPO has nothing to reinforce. A
randomly initialised model never does; a small instruct model has never seen these tags and rarely does. Both
learn the format here, by imitating a scripted expert, and GRPO then teaches the memory keeping. The tiny
model (tiny_policy) starts from nothing:
 1. build: a byte-level BPE tokenizer trained on data/ (Qwen's pre-tokenizer split, ChatML specials and chat
    template) and a randomly initialised Qwen2, saved so that it loads through the same Auto classes as Qwen;
 2. pretraining: next-token prediction on the world's text, so it learns to read and copy names;
 3. imitation of an imperfect expert. The toy world knows each question's hop chain, so a scripted expert can
    play the MemSearcher format perfectly: search the next hop, copy the fact it finds into memory, answer when
    memory holds the answer. It is made imperfect on purpose, with two mistakes drawn at random:
      - forget (a memory mistake): once the memory already holds a fact, an update drops the fact just found,
        so the agent searches the same thing again and, with few turns, never gets to answer;
      - answer early: with the final fact still missing, it answers with what the last hop found (the city
        instead of its country: the wrong field).
    The model imitates it by cross-entropy on exactly the tokens RL trains (the loss mask), to convergence.
    With --workflow react the expert plays ReAct; its mistake is to lose track of a fact (expert_trajectory).
The imitator then samples good and bad trajectories for the same question, which is what GRPO needs, while
greedy decoding follows the expert's more likely choice: it forgets, as the expert does 60% of the time.

Any other model (--model, --small) already reads and copies names: its cold start (cold_start) is step 3 alone,
the expert's conversations rendered through the model's own chat template, at --cold-lr (a pretrained model's
finetuning rate). The same story, for a real LLM: the format by imitation, the memory keeping by GRPO.

Either is built once per setting and kept in --warm-start-dir (runs/warm-start): a later run with the same
settings loads it and goes straight to GRPO, which starts from it and keeps it as the KL reference;
--rebuild-warm-start builds it again, and is what a damaged one asks for. Runs that need the same warm start
at once build it once: a lock per folder makes the others wait. This file uses memsearcher.py (prompt,
conversation format, log-probs); memsearcher.py's method never uses this file.
"""
import functools
import gc
import hashlib
import json
import math
import random
import re
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm.auto import tqdm

import memsearcher as ms
from retriever import format_hits, load_corpus, local_searcher
from runs import memory_warning, release_freed_memory, save_model, take_lock, tidy, write_atomic

# Bump a workflow's number when this file changes what its warm start (tiny or cold) produces: kept ones are
# then built again.
WARM_START_VERSION = {"memsearcher": 5, "react": 5}
# Everything else a warm start depends on: these settings and the data files (a test changes each setting that is
# not listed and checks that the warm start does not change).
WARM_START_SETTINGS = ["seed", "tiny_hidden", "tiny_layers", "tiny_vocab", "pretrain_steps", "warm_steps",
                       "warm_batch", "warm_lr", "expert_forget", "expert_early", "max_turns", "top_k",
                       "max_information_tokens", "max_passage_chars", "micro_batch_tokens", "logprob_chunk",
                       "grad_clip", "cpu_bf16"]
# A cold start's: the imitation's settings (the tiny model's are not used), and the model (model_identity).
COLD_START_SETTINGS = ["seed", "warm_steps", "warm_batch", "cold_lr", "expert_forget", "expert_early", "max_turns",
                       "top_k", "max_information_tokens", "max_passage_chars", "micro_batch_tokens", "logprob_chunk",
                       "grad_clip", "cpu_bf16"]


def warm_started(cfg):
    """The policy GRPO starts from, and keeps as its KL reference: the tiny model's warm start, another model's
    cold start when --warm-steps asks for one, or --model itself (a GGUF file: its plain copy)."""
    if cfg.model == "tiny":
        return tiny_policy(cfg)
    model = plain_copy(cfg) if cfg.model.endswith(".gguf") else cfg.model
    return cold_start(cfg, model) if cfg.warm_steps else model


def tiny_policy(cfg):
    """--model tiny -> the folder of its warm-started model: built and kept the first time, then reused."""
    settings = {name: getattr(cfg, name) for name in WARM_START_SETTINGS}
    return kept(cfg, "tiny", settings, build_tiny)


def cold_start(cfg, model):
    """--model PATH_OR_HUB_ID with --warm-steps -> the folder of the model after imitating the expert: built and
    kept the first time, then reused. `model`: what loads --model (a GGUF file's plain copy)."""
    settings = {name: getattr(cfg, name) for name in COLD_START_SETTINGS}
    settings["model"] = model_identity(cfg.model)
    path = Path(cfg.model).expanduser()
    name = path.resolve().name if path.is_dir() else path.name    # Qwen/Qwen2.5-0.5B-Instruct, model.gguf
    return kept(cfg, name, settings, functools.partial(build_cold, model))


def model_identity(model):
    """--model as a cold start's settings name it: a hub id by its name; a local folder or file by its path and
    its files' names, sizes and modification times, so that a model saved again into the same place gets a cold
    start of its own (hashing the weights themselves would read gigabytes at every run)."""
    path = Path(model).expanduser()
    if not path.exists():
        return model
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return {"path": str(path.resolve()), "files": [[str(f.relative_to(path)) if path.is_dir() else f.name,
                                                    f.stat().st_size, f.stat().st_mtime_ns]
                                                   for f in files if f.is_file()]}


def kept(cfg, name, settings, build):
    """The warm start of these settings and data: its folder in --warm-start-dir (name-workflow-seed-hash), built
    by build(cfg, questions, log) -> (model, tokenizer) the first time, then reused."""
    questions = training_questions(cfg)                 # before hashing the data: a real corpus is gigabytes
    settings["data_sha1"] = hashlib.sha1(b"".join(Path(f).read_bytes() for f in [cfg.corpus, *cfg.train_file])
                                         ).hexdigest()
    settings["version"] = WARM_START_VERSION[cfg.workflow]
    if cfg.workflow == "react":                         # its expert's own mistake rate
        settings["expert_lose_track"] = cfg.expert_lose_track
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    settings["workflow"] = cfg.workflow                 # named in the folder: its expert plays this workflow
    folder = Path(cfg.warm_start_dir) / f"{name}-{cfg.workflow}-seed{cfg.seed}-{digest}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock, holder = take_lock(folder.parent / f".lock-{folder.name}")    # one build at a time, the others wait
    if lock is None:
        print(f"warm start: waiting for the run (pid {holder or '?'}) that is building {folder}")
        lock, _ = take_lock(folder.parent / f".lock-{folder.name}", wait=True)
    with lock:
        tidy(folder.parent, prefix=folder.name)         # what a killed build of this folder left
        return reuse_or_build(cfg, folder, settings, questions, build)


def plain_copy(cfg):
    """--model FILE.gguf -> a folder holding it as a plain fp32 model: made once, kept in --warm-start-dir.

    transformers reads a GGUF file (with the gguf and accelerate packages) and dequantizes its tensors to fp32, but
    the model it returns still carries the file's quantization (save_pretrained refuses it, and a config copied from
    it would ask for the GGUF file again). Its weights go into a model built from the same config without that
    entry: one that trains, saves, checkpoints and resumes like any other."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = Path(cfg.model).expanduser().resolve()
    digest = hashlib.sha1(json.dumps(model_identity(cfg.model)).encode()).hexdigest()[:10]
    folder = Path(cfg.warm_start_dir) / f"{gguf.stem}-{digest}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock, _ = take_lock(folder.parent / f".lock-{folder.name}", wait=True)   # one copy made at a time
    with lock:
        tidy(folder.parent, prefix=folder.name)         # what a killed copy left
        if folder.exists() and not cfg.rebuild_warm_start:
            if why := damage(folder):
                raise SystemExit(f"{gguf.name}: its plain copy {folder} is damaged ({why}): --rebuild-warm-start "
                                 "makes it again")
            return str(folder)
        print(f"{gguf.name}: dequantizing it into a plain fp32 model, kept in {folder} for later runs")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = quantized.config
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict())
        model.generation_config = quantized.generation_config
        save_model(model, tokenizer, folder)            # whole or not at all: a temporary folder, then renamed
    return str(folder)


def training_questions(cfg):
    """The training questions; with --warm-steps, refused unless each has the hop chain its expert walks."""
    questions = [q for path in cfg.train_file for q in ms.load_questions(path)]
    missing = [q["id"] for q in questions if "support" not in q]
    if cfg.warm_steps and missing:
        raise SystemExit(f"--warm-steps needs questions with a 'support' hop chain (as data/make_world.py "
                         f"writes); {len(missing)} lack it, e.g. {missing[0]}. On other data, pass --warm-steps 0 "
                         "(--small imitates the toy world's expert by default).")
    return questions


def damage(folder):
    """What makes the kept warm start in `folder` unusable, or None."""
    for names in [["config.json"], ["model.safetensors", "model.safetensors.index.json"], ["tokenizer.json"]]:
        if not any((folder / name).is_file() for name in names):      # a large model is saved in shards
            return f"no {names[0]}"
    try:
        ms.load_policy(str(folder), torch.device("cpu"))
    except (Exception, SystemExit) as err:              # whatever a damaged file makes the loaders raise
        return f"it does not load: {type(err).__name__}"
    return None


def reuse_or_build(cfg, folder, settings, questions, build):
    record = folder / "warm_start.json"                 # written last: a folder without it is built again
    if record.exists() and not cfg.rebuild_warm_start:
        if why := damage(folder):
            raise SystemExit(f"warm start: {folder} is damaged ({why}): --rebuild-warm-start builds it again")
        print(f"warm start: reusing {folder}, built by an earlier run with these settings "
              "(--rebuild-warm-start builds it again)")
        return str(folder)
    t0 = time.time()
    log = {"settings": settings}
    model, tokenizer = build(cfg, questions, log)
    save_model(model, tokenizer, folder)
    del model                                           # GRPO loads the kept copy next: free this one's memory
    gc.collect()
    release_freed_memory()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log["build_s"] = round(time.time() - t0, 1)
    write_atomic(record, json.dumps(log, indent=1))
    print(f"warm start: built in {log['build_s']:.0f} s, kept in {folder}")
    return str(folder)


def build_tiny(cfg, questions, log):
    """The tiny model from nothing: tokenizer and random weights, pretraining, imitation -> (model, tokenizer)."""
    texts = tiny_tokenizer_texts(cfg)                   # reads the corpus: a bad line stops here, before any work
    print(f"warm start: building the tiny model ({cfg.pretrain_steps} pretraining and {cfg.warm_steps} imitation "
          f"steps); it is kept in {cfg.warm_start_dir} for later runs with these settings")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer = ms.load_policy(build_tiny_model(cfg, texts, tmp), device)
    if cfg.pretrain_steps:
        log["pretrain"] = pretrain(model, tokenizer, questions, cfg)
    if cfg.warm_steps:
        search = local_searcher(cfg.corpus, show_progress=False, max_chars=cfg.max_passage_chars)
        log["imitation"] = imitate(model, tokenizer, search, questions, cfg, cfg.warm_lr)
    return model, tokenizer


def build_cold(model_path, cfg, questions, log):
    """A pretrained model's cold start: it imitates the expert, nothing more -> (model, tokenizer)."""
    search = local_searcher(cfg.corpus, show_progress=False, max_chars=cfg.max_passage_chars)   # a bad line stops here
    print(f"warm start: {cfg.model} imitates the scripted expert for {cfg.warm_steps} steps (a cold start, "
          f"learning rate {cfg.cold_lr}); it is kept in {cfg.warm_start_dir} for later runs with these settings")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = ms.load_policy(model_path, device)
    warning = memory_warning(model, cfg)
    if warning:
        print(warning)
    if device.type == "cuda":
        model.gradient_checkpointing_enable()           # as in GRPO: a micro-batch's activations would not fit
    log["imitation"] = imitate(model, tokenizer, search, questions, cfg, cfg.cold_lr)
    if device.type == "cuda":
        model.gradient_checkpointing_disable()
    return model, tokenizer


# -----------------------------------------------------------------------------------------------------------
# 1. The tiny model.

QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")       # Qwen2Tokenizer's own pre-tokenizer split
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tiny_model(cfg, texts, path):
    """Train a tokenizer on `texts`, build a random Qwen2 on it, save both into `path` -> path."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    path = Path(path)
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


def small_qwen2(vocab, hidden, layers, **special_ids):
    """A randomly initialised Qwen2 (4 attention heads sharing 2 key/value heads, tied embeddings)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=4 * hidden, max_position_embeddings=4096,
        tie_word_embeddings=True, **special_ids))


def tiny_tokenizer_texts(cfg):
    """What the tiny tokenizer learns its merges from: the corpus, the questions and the prompt's words. The files
    are read by retriever.py's readers, as everywhere else: a bad line stops with its file and line (DataError)."""
    texts = [ms.SYSTEM_PROMPT, ms.user_message("", ""), ms.information_text([]), ms.MEMORY_INSTRUCTION,
             EXPERT_SEARCH, EXPERT_ANSWER, EXPERT_MEMORY] * 50
    texts += [f"{doc['title']}\n{doc['text']}" for doc in load_corpus(cfg.corpus)]   # a FlashRAG "contents"
    texts += [q["question"] for f in cfg.train_file for q in ms.load_questions(f)]
    return texts


# -----------------------------------------------------------------------------------------------------------
# 2. Pretraining.

def pretrain(model, tokenizer, questions, cfg, batch=16, length=256):
    """Next-token prediction on the world's text: passages (rendered as the agent sees them) and questions.

    A real LLM arrives pretrained: it can read and copy names before it ever searches. The tiny model starts
    from random weights, and imitation alone (whose loss sees only the tokens the agent writes) is slow to
    teach it to copy a name it has read. A minute and a half of ordinary language modelling, where every
    token is a target, fixes that.
    """
    rng = random.Random(cfg.seed)
    texts = [format_hits([p]) for p in load_corpus(cfg.corpus)] + [q["question"] for q in questions]
    rng.shuffle(texts)
    stream = [t for ids in tokenizer([t + "\n" for t in texts], add_special_tokens=False).input_ids for t in ids]
    chunks = [stream[i:i + length] for i in range(0, len(stream) - length + 1, length)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.warm_lr, weight_decay=0.0)
    model.train()
    losses = []
    bar = tqdm(range(cfg.pretrain_steps), desc="pretrain", unit="step")
    for _ in bar:
        rows = [{"ids": ids, "mask": [0] + [1] * (len(ids) - 1)} for ids in rng.sample(chunks, batch)]
        ids, attention, mask, _ = ms.collate(rows, tokenizer.pad_token_id, model.device)
        with ms.autocast(model.device, cfg.cpu_bf16):
            logp = ms.token_logprobs(model, ids, attention, mask, cfg.logprob_chunk)
        loss = -(logp * mask).sum() / mask.sum()                    # every token is a target here
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    return {"loss_end": sum(losses[-20:]) / len(losses[-20:])}


# -----------------------------------------------------------------------------------------------------------
# 3. Imitation of the imperfect expert.

# Spaces inside the tags keep names as the same tokens as in the question and passages (" Ilvo", not "Ilvo").
EXPERT_SEARCH = "<think> I need {0}. </think>\n<search> {0} </search>"
EXPERT_ANSWER = "<think> I can answer. </think>\n<answer> {} </answer>"
EXPERT_MEMORY = "<memory> {} </memory>"


def expert_trajectory(question, search, tokenizer, cfg, rng):
    """Play one question with the scripted expert -> a trajectory in the same format as ms.rollout()'s.

    Both workflows' experts search the same hops, and their mistakes are drawn from the same random numbers
    (expert_trajectories gives each question its own).
    MemSearcher's expert keeps a fact by writing it into its memory, and forgets by leaving it out. ReAct's
    expert cannot forget what stays in its context, so its mistake is to lose track: it takes a fact in by
    restating it at the start of its next thought, and loses track by not restating it and searching the same
    hop again. Either way the mistake is written down before the next action: the imitator learns it as a
    choice of its own.
    ReAct's rate is a little higher (--expert-lose-track 0.65 against --expert-forget 0.6): under greedy
    decoding, a fact left out of MemSearcher's memory leaves its next context exactly as it was, so its
    imitator repeats the mistake every turn, while ReAct's context changes with every search, which gives its
    imitator a fresh chance each turn. The README gives both experts' failure rates and both imitators' EM.
    """
    t = ms.new_trajectory(question)
    support, noted = question["support"], ""           # the facts the expert acts on (MemSearcher: its memory)
    restate = ""                                        # ReAct: the fact its next thought starts with
    end_of_turn = ms.turn_markers(tokenizer)[0]

    def write(conv, text):                              # one turn of the expert's: its text, then its end of turn
        ids = tokenizer(text, add_special_tokens=False).input_ids    # tokenized: it was never sampled
        ms.extend_conversation(conv, ids + [end_of_turn], True)

    def act(conv, text):                                # an action, its thought starting with `restate`
        write(conv, text.replace("<think> ", f"<think> {restate} ", 1) if restate else text)

    for turn in range(cfg.max_turns):
        if cfg.workflow == "memsearcher" or turn == 0:  # as in ms.rollout: ReAct keeps one conversation
            conv = {"ids": [], "mask": []}
            t["convs"].append(conv)
            ms.extend_conversation(conv, ms.render_prompt(tokenizer, question["question"], noted, cfg.workflow),
                                   False)
        known = [h for h in support if h["fact"] in noted]
        missing = [h for h in support if h["fact"] not in noted]
        if not missing or (known and rng.random() < cfg.expert_early):
            t["answer"] = question["golden_answers"][0] if not missing else known[-1]["finding"]
            act(conv, EXPERT_ANSWER.format(t["answer"]))
            t["stop"] = "answered"
            break
        hop = missing[0]
        act(conv, EXPERT_SEARCH.format(hop["query"]))
        if cfg.workflow == "react" and turn == cfg.max_turns - 1:    # as in ms.rollout: no next action to read in
            t["stop"] = "max_turns"
            break
        hits = search([hop["query"]], cfg.top_k)[0]
        ms.extend_conversation(conv, ms.after_search_ids(tokenizer, hits, cfg.workflow, cfg.max_information_tokens),
                               False)
        rate = cfg.expert_forget if cfg.workflow == "memsearcher" else cfg.expert_lose_track
        kept = not (noted and rng.random() < rate)
        if kept:
            noted = f"{noted} {hop['fact']}".strip()
        if cfg.workflow == "memsearcher":
            write(conv, EXPERT_MEMORY.format(noted))
        else:
            restate = hop["fact"] if kept else ""
    t["stop"] = t["stop"] or "max_turns"
    t["reward"] = ms.trajectory_reward(t, "em")             # exact match, whatever --reward is: its failure rate
    return t


def scripted_policy(questions, searches):
    """A stand-in for the model with generate()'s signature, for measuring context lengths on any machine.

    It knows each toy-world question's hop chain: it searches `searches` times, walking the chain again from
    the start when it runs out of hops, and then answers with the gold answer. Its memory holds every
    supporting fact it has read. Its texts are tokenized (they were never sampled) and end its turn, so it
    measures lengths, not learning.
    """
    by_text = {q["question"]: q for q in questions}
    calls = Counter()                                      # action phases so far, per question

    def generate_fn(model, tokenizer, contexts, max_new_tokens, greedy, temperature=1.0):
        end_of_turn, outs = ms.turn_markers(tokenizer)[0], []
        for context in contexts:
            text = tokenizer.decode(context)
            q = by_text[re.findall(r"<question> (.*?) </question>", text)[-1]]
            if ms.MEMORY_INSTRUCTION in text:                # asked for its memory (MemSearcher's conversations)
                facts = [h["fact"] for h in q["support"] if h["fact"] in text]
                out = EXPERT_MEMORY.format(" ".join(dict.fromkeys(facts)))
            else:
                calls[q["question"]] += 1
                n = calls[q["question"]]
                out = (EXPERT_SEARCH.format(q["support"][(n - 1) % len(q["support"])]["query"]) if n <= searches
                       else EXPERT_ANSWER.format(q["golden_answers"][0]))
            outs.append((tokenizer(out, add_special_tokens=False).input_ids + [end_of_turn], out, True))
        return outs
    return generate_fn


def warmup_cosine(optimizer, steps, warmup=20):
    """Learning rate: linear warm-up over `warmup` steps, then cosine decay to 0 at `steps`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))


def expert_trajectories(questions, search, tokenizer, cfg):
    """The expert plays every question, each with random numbers of its own (drawn from the seed and the
    question's id): both workflows' experts then make their mistakes at the same points of the same questions,
    and a decision that differs on one question cannot shift the draws of all the questions after it."""
    return [expert_trajectory(q, search, tokenizer, cfg, random.Random(f"expert {cfg.seed} {q['id']}"))
            for q in tqdm(questions, desc="expert", leave=False)]


def imitate(model, tokenizer, search, questions, cfg, lr):
    """Imitation learning on expert trajectories: token-level cross-entropy on the loss-mask tokens, at the peak
    learning rate `lr` (the tiny model's --warm-lr, another model's --cold-lr)."""
    rng = random.Random(cfg.seed)
    experts = expert_trajectories(questions, search, tokenizer, cfg)
    rows = [c for t in experts for c in t["convs"]]
    flawed = sum(t["reward"] == 0 for t in experts) / len(experts)
    print(f"imitation: {len(experts)} expert trajectories ({flawed:.0%} end without the right answer), "
          f"{len(rows)} conversations")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, cfg.warm_steps)
    model.train()
    order, losses = [], []
    bar = tqdm(range(cfg.warm_steps), desc="imitation", unit="step")
    for _ in bar:
        if len(order) < cfg.warm_batch:
            order += rng.sample(range(len(rows)), len(rows))          # another shuffled pass over the data
        batch, order = [rows[i] for i in order[:cfg.warm_batch]], order[cfg.warm_batch:]
        n_tokens = sum(sum(r["mask"]) for r in batch)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in ms.pack_micro_batches(batch, cfg.micro_batch_tokens):
            ids, attention, mask, _ = ms.collate(micro, tokenizer.pad_token_id, model.device)
            with ms.autocast(model.device, cfg.cpu_bf16):
                logp = ms.token_logprobs(model, ids, attention, mask, cfg.logprob_chunk)
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
