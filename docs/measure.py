"""The measurements behind the README's figures, kept out of memsearcher.py's reading path.

    python docs/measure.py both-trained --tiny --seeds 0 1 2
    python docs/measure.py compare --tiny --model runs/tiny/checkpoint-000030 --questions-per-step 5
    python docs/measure.py smol-speed runs/warm-start/SmolLM2-135M-Instruct.Q4_1-memsearcher-seed0-...
    python docs/measure.py small-rehearsal
    python docs/measure.py logprob-memory
    python docs/measure.py sampler
    python docs/measure.py bm25 10000 100000 1000000
    python docs/measure.py curves runs/tiny

both-trained: MemSearcher and ReAct each warm-started (built once, then reused) and trained by the same GRPO
budget, per seed (--seeds 0 1 2); greedy test EM before and after, context per turn, tokens processed, seconds
per step, peak memory. Any memsearcher.py flag works after `both-trained` (e.g. --top-k 5).
compare: one policy, both workflows (MemSearcher and ReAct) on the same test questions: EM, context per turn,
tokens processed, peak memory; the same with a scripted policy that searches until the last turn (lengths
only); and rollout throughput, batched as in training vs one trajectory at a time. Any memsearcher.py flag
works after `compare` (--tiny builds or reuses the warm-started tiny model), plus --compare-turns.
smol-speed: one --smol GRPO step (8 questions x G=4) from a cold-started model: rollout and update time in fp32
and under bf16 autocast, and the update's time and peak memory by micro-batch size.
small-rehearsal: `--small`'s whole path on the CPU (cold start, pre-flight, a GRPO step with its settings, its
checkpoint, evaluation) with Qwen2.5's real tokenizer and a random Qwen2.5-0.5B-shaped model cut to --layers
(and --hidden); the time of each phase and the peak memory.
logprob-memory: peak memory of chunked log-probs (memsearcher.token_logprobs) vs full logits, Qwen2.5's vocab.
sampler: the time of one sampling step, memsearcher.SampleFromSoftmax vs torch.multinomial.
bm25: retriever.py's BM25 index on synthetic corpora of N passages: build time, memory, query latency.
curves: per GRPO step the reward, the share that answered and the mixed groups, and greedy EM per evaluation,
of one run or several (seeds) on the same axes, from their metrics.jsonl, as a PNG.
The PNGs need matplotlib (pip install matplotlib); nothing else does.
"""
import argparse
import json
import multiprocessing
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))     # memsearcher.py and data/ live one up
import memsearcher as ms                                             # noqa: E402
import retriever                                                     # noqa: E402
import settings                                                      # noqa: E402
from data.qwen_tokenizer import qwen25_05b_shaped                   # noqa: E402
from data.warm_start import scripted_policy, small_qwen2, warm_started  # noqa: E402


# -----------------------------------------------------------------------------------------------------------
# MemSearcher vs ReAct: the paper's trade-off, measured. The same policy, the same test questions, both
# workflows. ReAct keeps every turn in one context, so its context and its cost grow with the turns;
# MemSearcher's context holds the question and the memory only, so it stays flat.

def peak_memory_mb(device):
    """CUDA: peak allocated since the last reset. CPU: the process's peak resident set so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024       # Linux reports KiB


def workflow_metrics(trajs, seconds, device):
    """What the comparison table shows for one workflow (its EM: the evaluations' reward)."""
    for t in trajs:
        t["reward"] = ms.trajectory_reward(t, "em")
    m = ms.summarize(trajs)
    return {"em": m["em"], "turns": m["turns"], "context_mean": m["context_tokens_per_turn"],
            "context_max": m["context_tokens_max"], "processed_tokens": m["processed_tokens"],
            "sampled_tokens": m["sampled_tokens"], "generation_s": round(seconds, 2),
            "peak_memory_mb": round(peak_memory_mb(device), 1), "stops": m["stops"]}


def compare_workflows(model, tokenizer, search, questions, cfg, turns, scripted_searches=None):
    """Greedy rollouts of the same questions with both workflows -> {workflow: metrics}.

    With scripted_searches, the scripted policy plays instead of the model (the model is not used)."""
    results = {}
    for workflow in ms.WORKFLOWS:
        if model.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        fn = scripted_policy(questions, scripted_searches) if scripted_searches else ms.generate
        t0 = time.time()
        trajs = ms.rollout(model, tokenizer, search, questions, cfg, greedy=True, max_turns=turns,
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
            trajs = ms.rollout(model, tokenizer, search, questions, cfg)
        else:
            trajs = [t for q in questions for t in ms.rollout(model, tokenizer, search, [q], cfg)]
        seconds = time.time() - t0
        tokens = sum(sum(c["mask"]) for t in trajs for c in t["convs"])
        rates[mode] = {"trajectories": len(trajs), "sampled_tokens": tokens, "seconds": round(seconds, 2),
                       "tokens_per_s": round(tokens / seconds, 1)}
    rates["speedup"] = round(rates["batched"]["tokens_per_s"] / rates["one at a time"]["tokens_per_s"], 2)
    return rates


def compare(cfg, turns):
    """Evaluate both workflows (the model and the scripted policy), measure rollout throughput, report."""
    train_qs, test_qs, search = ms.load_data(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = ms.load_policy(warm_started(cfg), device)
    model.eval()
    results = {"model": cfg.model, "device": str(device), "questions": len(test_qs), "max_turns": turns,
               "policies": {"model (greedy)": compare_workflows(model, tokenizer, search, test_qs, cfg, turns)}}
    if all("support" in q for q in test_qs):
        results["policies"]["scripted (searches until the last turn)"] = compare_workflows(
            model, tokenizer, search, test_qs, cfg, turns, scripted_searches=turns - 1)
    batch = [q for q in train_qs[:cfg.questions_per_step] for _ in range(cfg.group_size)]   # one training batch
    results["throughput"] = rollout_throughput(model, tokenizer, search, batch, cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
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


# -----------------------------------------------------------------------------------------------------------
# MemSearcher and ReAct, both trained: the paper's headline comparison in miniature. Each workflow starts from
# its own warm start (the same pretraining, the same expert searches with their mistakes drawn from the same
# random numbers, the same imitation steps) and gets the same GRPO budget on the same questions at every step;
# both are then evaluated greedily on the same test questions.

def train_one(cfg):
    """One GRPO run, in its own process (so that its peak memory is its own) -> what the table shows."""
    import resource
    import runs
    initial = warm_started(cfg)
    t0 = time.time()
    ms.grpo_run(cfg, initial)
    records = runs.read_metrics(Path(cfg.output_dir))
    evals, steps = [r["eval"] for r in records if "eval" in r], [r for r in records if "reward" in r]
    return {"before": evals[0], "after": evals[-1], "run_s": round(time.time() - t0, 1),
            "rollout_s": sum(r["rollout_s"] for r in steps) / len(steps),
            "update_s": sum(r["step_s"] - r["rollout_s"] for r in steps) / len(steps),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def both_trained(argv, seeds, out):
    """Warm start (built once, then reused) and GRPO for both workflows and every seed -> table, JSON, PNG."""
    results = {}
    for seed in seeds:
        for workflow in ms.WORKFLOWS:
            cfg = settings.parse_args([*argv, "--workflow", workflow, "--seed", str(seed),
                                       "--output-dir", str(out / f"{workflow}-seed{seed}")], ms.Config, ms.PRESETS)
            print(f"\n=== {workflow}, seed {seed} ===", flush=True)
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                results[f"{workflow} seed {seed}"] = pool.apply(train_one, (cfg,))
                pool.close()                                # let it exit by itself, not be terminated
                pool.join()
    report = {"command": argv, "seeds": seeds, "runs": results}
    out.mkdir(parents=True, exist_ok=True)
    (out / "both_trained.json").write_text(json.dumps(report, indent=1))
    print_both_trained(results, seeds)
    print(f"written: {out / 'both_trained.json'}")
    plot_both_trained(results, seeds, out / "both_trained.png")
    return report


def print_both_trained(results, seeds):
    """Means over seeds (per-seed values in the JSON), side by side."""
    def mean(workflow, get):
        return sum(get(results[f"{workflow} seed {s}"]) for s in seeds) / len(seeds)

    def row(label, get, fmt="{:.0f}"):
        print(f"{label:36}" + "".join(f"{fmt.format(mean(w, get)):>18}" for w in ms.WORKFLOWS))

    def em_row(label, get):             # before -> after GRPO
        cells = [f"{mean(w, lambda r: get(r['before'])):.3f} -> {mean(w, lambda r: get(r['after'])):.3f}"
                 for w in ms.WORKFLOWS]
        print(f"{label:36}" + "".join(f"{c:>18}" for c in cells))

    print(f"\nboth trained; means over seeds {seeds}\n{'':36}" + "".join(f"{w:>18}" for w in ms.WORKFLOWS))
    em_row("greedy test EM, before -> after GRPO", lambda m: m["em"])
    for kind in results[f"memsearcher seed {seeds[0]}"]["after"]["em_by_type"]:
        em_row(f"  {kind}", lambda m: m["em_by_type"][kind])

    def turn_row(label, turn, key, combine):             # over the seeds whose runs reached this turn
        cells = []
        for w in ms.WORKFLOWS:
            values = [results[f"{w} seed {s}"]["after"][key][turn] for s in seeds
                      if len(results[f"{w} seed {s}"]["after"][key]) > turn]
            cells.append(f"{combine(values):.0f}" if values else "-")
        print(f"{label:36}" + "".join(f"{c:>18}" for c in cells))

    turns = max(len(r["after"]["context_tokens_per_turn"]) for r in results.values())
    for i in range(turns):
        turn_row(f"context tokens at turn {i + 1}: mean", i, "context_tokens_per_turn", lambda v: sum(v) / len(v))
        turn_row("                   max, any seed", i, "context_tokens_max", max)
    row("context tokens at the last turn", lambda r: r["after"]["last_turn_context"])
    row("tokens processed per trajectory", lambda r: r["after"]["processed_tokens"])
    row("seconds per GRPO step: rollout", lambda r: r["rollout_s"], "{:.2f}")
    row("                       update", lambda r: r["update_s"], "{:.2f}")
    row("peak memory of the run (RSS, MB)", lambda r: r["peak_rss_mb"])


def plot_both_trained(results, seeds, path):
    """EM before and after GRPO, and context per turn after, for both workflows -> PNG (needs matplotlib)."""
    plt = pyplot_or_none(path)
    if plt is None:
        return
    fig, (em, context) = plt.subplots(1, 2, figsize=(10, 3.5))
    for i, workflow in enumerate(ms.WORKFLOWS):
        runs = [results[f"{workflow} seed {s}"] for s in seeds]
        em.bar([i - 0.2, i + 0.2], [sum(r[k]["em"] for r in runs) / len(runs) for k in ["before", "after"]],
               width=0.35, color=["#bbbbbb", f"C{i}"])
        per_turn = [r["after"]["context_tokens_per_turn"] for r in runs]
        turns = range(max(len(c) for c in per_turn))        # each turn: over the runs that reached it
        mean = [sum(c[t] for c in per_turn if len(c) > t) / sum(len(c) > t for c in per_turn) for t in turns]
        context.plot([t + 1 for t in turns], mean, marker="o", color=f"C{i}", label=workflow)
    em.set(xticks=range(len(ms.WORKFLOWS)), xticklabels=[f"{w}\nbefore | after" for w in ms.WORKFLOWS],
           ylabel="greedy test EM", ylim=(0, 1), title=f"both trained by GRPO (mean of {len(seeds)} seeds)")
    context.set(xlabel="turn", ylabel="context tokens (mean)", ylim=(0, None), title="context per turn after GRPO")
    context.xaxis.get_major_locator().set_params(integer=True)
    context.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


# -----------------------------------------------------------------------------------------------------------
# Log-probs without the [B, T, V] tensor.

def logprob_memory(chunk, output, rows=16, length=1024, vocab=151_936):
    """Peak memory that log-probs + backward add over rows x length tokens with Qwen's vocab.

    A two-layer Qwen2 with hidden size 64 and Qwen2.5's 151,936-token vocabulary stands in for the model: the
    output layer is what matters. Chunked = token_logprobs(); full = the usual logits.log_softmax().gather(),
    which holds several [B, T, V] fp32 tensors at once. On a CPU each measurement runs in a fresh process (peak
    resident memory can only grow); full logits are measured at 1 and 2 rows and scaled to `rows`, because at
    16 x 1024 they need tens of GB.
    """
    results = {}
    for method, n in [("chunked", rows), ("full logits", 1), ("full logits", 2)]:
        if torch.cuda.is_available():
            added = _logprob_peak(method, n, length, vocab, chunk)
        else:
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                added = pool.apply(_logprob_peak, (method, n, length, vocab, chunk))
        results[f"{method}, {n} x {length}"] = round(added)
        print(f"{method:12} {n:3} x {length} tokens: +{added:,.0f} MB peak")
    per_row = results[f"full logits, 2 x {length}"] - results[f"full logits, 1 x {length}"]
    results[f"full logits, {rows} x {length} (scaled)"] = round(results[f"full logits, 1 x {length}"]
                                                                 + (rows - 1) * per_row)
    print(f"full logits  {rows} x {length} tokens: ~+{results[f'full logits, {rows} x {length} (scaled)']:,} MB "
          f"(scaled from 1 and 2 rows: {per_row:,.0f} MB per row)")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"chunk": chunk, **results}, indent=1))
    print(f"written: {output}")
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
        logp = ms.token_logprobs(model, ids, attention, mask, chunk)
    else:
        logits = model(input_ids=ids, attention_mask=attention).logits.float()            # [B, T, V]
        logp = logits[:, :-1].log_softmax(-1).gather(2, ids[:, 1:, None]).squeeze(2)      # [B, T-1]
    logp.sum().backward()
    return peak_memory_mb(device) - before


# -----------------------------------------------------------------------------------------------------------
# The sampler.

def sampler_speed(rows=128, vocab=2813, calls=200):
    """memsearcher.SampleFromSoftmax against softmax + torch.multinomial on one [rows, vocab] batch of logits."""
    torch.manual_seed(0)
    scores = torch.randn(rows, vocab) * 2
    sample = ms.SampleFromSoftmax(1.0)
    timings = {}
    for name, fn in [("SampleFromSoftmax", lambda: sample(None, scores)),
                     ("softmax + torch.multinomial", lambda: torch.multinomial(torch.softmax(scores, -1), 1))]:
        fn()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        timings[name] = (time.perf_counter() - t0) / calls * 1000
        print(f"[{rows}, {vocab}] logits, {name}: {timings[name]:.2f} ms a call")
    return timings


# -----------------------------------------------------------------------------------------------------------
# A run's curves.

def plot_curves(folders):
    """Per GRPO step, the training reward, the share of trajectories that answered and the share of groups with
    mixed rewards (a collapse shows in the last two before the mean); greedy test EM per evaluation. Several runs
    (seeds) share the axes -> curves.png in the first run's folder (needs matplotlib), and the figure."""
    out = folders[0] / "curves.png"
    plt = pyplot_or_none(out, "; the numbers are in metrics.jsonl")
    if plt is None:
        return
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    titles = ["training reward", "share of trajectories that answered", "share of groups with mixed rewards",
              "greedy test EM"]
    for folder in folders:
        records = [json.loads(line) for line in open(folder / "metrics.jsonl")]
        steps = [r for r in records if "reward" in r]
        evals = [(r["step"], r["eval"]["em"]) for r in records if "eval" in r]
        for ax, key in zip(axes, ["reward", "answered", "mixed_groups"]):
            ax.plot([r["step"] for r in steps], [r[key] for r in steps], label=folder.name)
        axes[3].plot(*zip(*evals), marker="o", label=folder.name)
    for ax, title in zip(axes, titles):
        ax.set(title=title, xlabel="GRPO step")
    for ax in axes[1:]:
        ax.set_ylim(0, 1)
    if len(folders) > 1:
        axes[3].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"plots: {out}")
    return fig


# -----------------------------------------------------------------------------------------------------------
# --smol's speed and memory on a CPU: one GRPO step's rollout and update (its settings: 8 questions x G=4), in fp32
# and under bf16 autocast, and the update's peak memory by micro-batch size. The choices of the preset come from
# these figures.

def peak_rss_gb(reset=False):
    """The process's peak resident memory since the last reset (Linux: VmHWM, reset through clear_refs)."""
    if reset:
        Path("/proc/self/clear_refs").write_text("5")
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text())[1]) / 1e6


def smol_speed(folder, micro_batches):
    """A cold-started --smol model (`folder`): the same step's rollout and update in fp32 and bf16 autocast, then
    the bf16 update with each micro-batch size -> a table, also as JSON in `folder`/../smol_speed.json."""
    cfg = settings.parse_args(["--smol", "--model", str(folder), "--warm-steps", "0"], ms.Config, ms.PRESETS)
    train_qs, _, search = ms.load_data(cfg)
    model, tokenizer = ms.load_policy(str(folder), torch.device("cpu"))
    results = {"bf16 supported": ms.cpu_computes_bf16()}

    def one_step(**overrides):
        step_cfg = ms.Config(**{**cfg.__dict__, **overrides})
        policy, _ = ms.load_policy(str(folder), torch.device("cpu"))          # every step from the same weights
        optimizer = torch.optim.AdamW(policy.parameters(), lr=step_cfg.lr, weight_decay=step_cfg.weight_decay)
        batch = ms.begin_step(train_qs, step_cfg, 0)
        peak_rss_gb(reset=True)
        _, stats = ms.grpo_step(policy, None, optimizer, tokenizer, search, batch, step_cfg)
        return {"rollout_s": stats["rollout_s"], "update_s": round(stats["step_s"] - stats["rollout_s"], 1),
                "sampled_tokens_per_s": stats["sampled_tokens_per_s"], "peak_rss_gb": round(peak_rss_gb(), 2)}

    for cpu_bf16 in (False, True):
        results[f"{'bf16' if cpu_bf16 else 'fp32'}, micro-batch {cfg.micro_batch_tokens}"] = one_step(cpu_bf16=cpu_bf16)
        print(results, flush=True)
    for tokens in micro_batches:
        if tokens != cfg.micro_batch_tokens:
            results[f"bf16, micro-batch {tokens}"] = one_step(micro_batch_tokens=tokens)
            print(results, flush=True)
    del model
    print(f"{'':28}{'rollout s':>10}{'update s':>10}{'tokens/s':>10}{'peak GB':>9}")
    for name, r in results.items():
        if isinstance(r, dict):
            print(f"{name:28}{r['rollout_s']:>10}{r['update_s']:>10}{r['sampled_tokens_per_s']:>10}"
                  f"{r['peak_rss_gb']:>9}")
    (Path(folder).parent / "smol_speed.json").write_text(json.dumps(results, indent=1))


# -----------------------------------------------------------------------------------------------------------
# `--small` rehearsed on a CPU: Qwen2.5-Instruct's real tokenizer and a random model of Qwen2.5-0.5B's shape cut
# to a layer or two, through every phase of `python memsearcher.py --small` with its GRPO settings (the KL
# term, two updates per step, log-probs in chunks of 256), at a size a CPU finishes in minutes. Random weights never
# end their turn, so every generation runs to its token limit: this checks the path, not learning.

def small_stand_in(folder, layers, hidden):
    """A model folder as the hub gives Qwen/Qwen2.5-0.5B-Instruct, built offline: the real tokenizer, the
    generation config Qwen ships (both end ids, its sampling defaults) and random weights of the real shape,
    cut to `layers` layers (and to width `hidden`, less than its 896, to check the path with less work)
    -> (folder, parameters)."""
    from transformers import GenerationConfig
    from data.qwen_tokenizer import qwen25_tokenizer
    qwen25_tokenizer(folder)
    torch.manual_seed(0)
    model = qwen25_05b_shaped(layers) if hidden == 896 else \
        small_qwen2(151_936, hidden, layers, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
    model.save_pretrained(folder)
    GenerationConfig(bos_token_id=151643, eos_token_id=[151645, 151643], pad_token_id=151643, do_sample=True,
                     temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05).save_pretrained(folder)
    return folder, sum(p.numel() for p in model.parameters())


# --small's settings, with fewer of everything: a CPU finishes them in minutes
REHEARSAL = ["--small", "--warm-steps", "1", "--warm-batch", "2", "--steps", "1", "--questions-per-step", "1",
             "--group-size", "2", "--eval-n", "1", "--max-turns", "2", "--eval-max-turns", "2",
             "--max-new-tokens", "16", "--save-every", "1", "--print-every", "0"]


def run_phase(args):
    """python memsearcher.py ARGS in a child process -> (its output, wall seconds, its own peak RSS in MB)."""
    import os
    import subprocess
    t0 = time.time()
    child = subprocess.Popen([sys.executable, str(Path(ms.__file__)), *args], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)               # this child's own resource usage
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"memsearcher.py {' '.join(args)} failed ({child.returncode}):\n{output[-3000:]}")
    return output, time.time() - t0, usage.ru_maxrss / 1024


def small_rehearsal(out, layers, hidden):
    """Build the stand-in, run --small's phases on it (cold start, step-0 evaluation and pre-flight, a GRPO step,
    its checkpoint and the final evaluation) -> the timings, also written to out/rehearsal.json."""
    import runs
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model, parameters = small_stand_in(out / f"qwen2.5-0.5b-shaped-{layers}-layers-{hidden}-wide", layers, hidden)
    built_s = time.time() - t0
    args = [*REHEARSAL, "--model", str(model), "--output-dir", str(out / "run"),
            "--warm-start-dir", str(out / "warm-start")]
    output, run_s, run_mb = run_phase(args)
    records = runs.read_metrics(out / "run")
    steps = {r["step"]: r for r in records if "reward" in r}
    evals = {r["step"]: r for r in records if "eval" in r}
    cold = json.loads(next((out / "warm-start").glob("*/warm_start.json")).read_text())
    report = {"layers": layers, "hidden": hidden, "parameters_m": round(parameters / 1e6, 1),
              "stand_in_s": round(built_s, 1), "cold_start_s": cold["build_s"], "eval_step0_s": evals[0]["eval_s"],
              "preflight_warned": "warning: GRPO will very likely learn nothing here" in output,
              "steps": {n: {"rollout_s": r["rollout_s"], "update_s": round(r["step_s"] - r["rollout_s"], 2),
                            "kl": r["kl"], "grad_norm": r["grad_norm"]} for n, r in sorted(steps.items())},
              "checkpoints": sorted(p.name for p in (out / "run").glob("checkpoint-*")),
              "eval_final_s": evals[1]["eval_s"], "wall_s": round(run_s, 1), "peak_rss_mb": round(run_mb)}
    (out / "rehearsal.json").write_text(json.dumps(report, indent=1))
    print(f"--small rehearsed on the CPU: Qwen2.5-0.5B's shape cut to {layers} layer(s) of width {hidden}, "
          f"{report['parameters_m']}M parameters, the real tokenizer")
    rows = [("build the stand-in (tokenizer, random weights)", report["stand_in_s"]),
            ("cold start (1 imitation step)", report["cold_start_s"]),
            ("step-0 evaluation (1 question) and pre-flight", report["eval_step0_s"]),
            *[(f"GRPO step {n}: rollout / update (KL, 2 updates)", f"{r['rollout_s']} / {r['update_s']}")
              for n, r in report["steps"].items()],
            ("final evaluation", report["eval_final_s"]),
            ("the whole run (start-up to final evaluation)", report["wall_s"])]
    for name, seconds in rows:
        print(f"  {name:<52} {seconds} s")
    print(f"peak memory {report['peak_rss_mb']:,} MB; pre-flight warned: {report['preflight_warned']}; "
          f"checkpoints: {', '.join(report['checkpoints'])}")
    print(f"written: {out / 'rehearsal.json'}")
    return report


# -----------------------------------------------------------------------------------------------------------
# BM25 at scale: retriever.py's in-memory index on synthetic corpora of N passages (build time, memory, query
# latency), and rank_bm25 beside it up to 100k passages.

SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def pseudo_word(i):
    """A distinct pronounceable word per integer (its base-70 digits as syllables)."""
    word = SYLLABLES[i % 70]
    while i >= 70:
        i //= 70
        word += SYLLABLES[i % 70]
    return word


def synthetic_corpus(n, vocab_size=100_000, seed=0):
    """n passages of 60-100 words drawn from a Zipf law (the r-th most common word has probability ~ 1/r, so the
    top words occur in almost every passage), each titled with two rare words. Deterministic given seed."""
    rng = np.random.default_rng(seed)
    words = [pseudo_word(i) for i in range(vocab_size)]
    p = 1.0 / np.arange(1, vocab_size + 1)
    lengths = rng.integers(60, 101, size=n)
    tokens = rng.choice(vocab_size, size=int(lengths.sum()), p=p / p.sum())
    titles = rng.integers(vocab_size // 2, vocab_size, size=(n, 2)).tolist()
    ends = np.cumsum(lengths).tolist()
    return [{"id": str(i), "title": f"{words[a]} {words[b]}".title(),
             "text": " ".join(map(words.__getitem__, tokens[end - size:end].tolist()))}
            for i, ((a, b), end, size) in enumerate(zip(titles, ends, lengths.tolist()))]


def rss_mb():
    """Resident memory of this process now, in MB, from /proc (Linux only)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def bm25_at_scale(sizes, n_queries=100, seed=0):
    """Per corpus size: the index's build time and memory, and the latency of one 6-word query (top 10)."""
    for n in sizes:
        docs = synthetic_corpus(n, seed=seed)
        rng = np.random.default_rng(seed + 1)
        queries = [" ".join(rng.choice(docs[i]["text"].split(), 6, replace=False))
                   for i in rng.integers(0, n, n_queries)]
        rss_before, start = rss_mb(), time.perf_counter()
        index = retriever.build_index(docs, show_progress=False)
        build_s = time.perf_counter() - start
        arrays_mb = sum(a.nbytes for a in index[2:5]) / 2**20
        latencies = []
        for q in queries:
            start = time.perf_counter()
            retriever.search(index, [q], 10)
            latencies.append(1000 * (time.perf_counter() - start))
        print(f"{n:>9,} passages: build {build_s:6.1f} s, index arrays {arrays_mb:6.0f} MB "
              f"(RSS +{rss_mb() - rss_before:.0f} MB, {len(index.vocab):,} terms), query "
              f"mean {np.mean(latencies):.2f} ms, p95 {np.percentile(latencies, 95):.2f} ms", flush=True)
        if n <= 100_000:                                 # rank_bm25 scores every passage in a Python loop
            from rank_bm25 import BM25Okapi
            bm25 = BM25Okapi([retriever.passage_tokens(doc) for doc in docs])
            start = time.perf_counter()
            for q in queries[:5]:
                bm25.get_scores(retriever.tokenize(q))
            print(f"{'':>19} rank_bm25 get_scores: {200 * (time.perf_counter() - start):.0f} ms/query")
        del docs, index


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ["compare", "both-trained", "smol-speed", "small-rehearsal", "logprob-memory", "sampler", "bm25",
                "curves"]
    if not argv or argv[0] not in commands:
        raise SystemExit(__doc__.split("\n\n")[1] + f"\nusage: python docs/measure.py {{{','.join(commands)}}} ...")
    command, rest = argv[0], argv[1:]
    if command == "compare":
        parser = argparse.ArgumentParser(prog="docs/measure.py compare", add_help=False)
        parser.add_argument("--compare-turns", type=int, default=8, help="max turns per trajectory")
        own, rest = parser.parse_known_args(rest)
        if own.compare_turns < 2:
            raise SystemExit("--compare-turns must be at least 2 (one search, one answer)")
        compare(settings.parse_args(rest, ms.Config, ms.PRESETS), own.compare_turns)
    elif command == "both-trained":
        parser = argparse.ArgumentParser(prog="docs/measure.py both-trained", add_help=False)
        parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per workflow and seed")
        parser.add_argument("--out", default="runs/both-trained", help="where the runs, table and PNG go")
        own, rest = parser.parse_known_args(rest)
        both_trained(rest, own.seeds, Path(own.out))
    elif command == "smol-speed":
        parser = argparse.ArgumentParser(prog="docs/measure.py smol-speed")
        parser.add_argument("folder", help="a cold-started --smol model (runs/warm-start/SmolLM2-...-memsearcher-...)")
        parser.add_argument("--micro-batch-tokens", type=int, nargs="+", default=[1024, 2048, 4096])
        args = parser.parse_args(rest)
        smol_speed(Path(args.folder), args.micro_batch_tokens)
    elif command == "small-rehearsal":
        parser = argparse.ArgumentParser(prog="docs/measure.py small-rehearsal")
        parser.add_argument("--layers", type=int, default=1, help="of Qwen2.5-0.5B's 24")
        parser.add_argument("--hidden", type=int, default=896, help="Qwen2.5-0.5B's width; less checks the path faster")
        parser.add_argument("--out", default="runs/small-rehearsal", help="where the stand-in, runs and JSON go")
        args = parser.parse_args(rest)
        small_rehearsal(Path(args.out), args.layers, args.hidden)
    elif command == "logprob-memory":
        parser = argparse.ArgumentParser(prog="docs/measure.py logprob-memory")
        parser.add_argument("--chunk", type=int, default=256, help="positions per chunk (memsearcher's default)")
        parser.add_argument("--output", default="runs/logprob_memory.json", help="where the numbers go")
        args = parser.parse_args(rest)
        logprob_memory(args.chunk, Path(args.output))
    elif command == "sampler":
        sampler_speed()
    elif command == "bm25":
        parser = argparse.ArgumentParser(prog="docs/measure.py bm25")
        parser.add_argument("sizes", type=int, nargs="+", metavar="N", help="passages in a synthetic corpus")
        args = parser.parse_args(rest)
        if min(args.sizes) < 1:
            parser.error(f"every N must be at least 1 (got {min(args.sizes)})")
        bm25_at_scale(args.sizes)
    else:
        missing = [f for f in rest if not (Path(f) / "metrics.jsonl").is_file()]
        if not rest or missing:
            raise SystemExit("usage: python docs/measure.py curves RUN_FOLDER [RUN_FOLDER ...] (folders with a "
                             f"metrics.jsonl){'; without one: ' + ', '.join(missing) if missing else ''}")
        plot_curves([Path(f) for f in rest])


if __name__ == "__main__":
    main()
