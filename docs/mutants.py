"""Break the method on purpose, and check that the fast test tier catches every break.

    python docs/mutants.py                   # every broken variant below, against the fast tier
    python docs/mutants.py 3 7               # some of them, by number
    python docs/mutants.py --learning 1 5    # against the slow learning test instead (and the code as it is)

Each variant replaces a few lines of memsearcher.py in a copy of the repository with a broken version, runs the
fast tier there (python -m pytest -m "not slow"), and lists the tests that failed. A variant that no test
catches is a hole in the fast tier. The table of variants and the tests that catch them in docs/MEASUREMENTS.md
comes from this script's output; test_docs.py checks that every variant still applies to the current code.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (what breaks, [(the lines as they are in memsearcher.py, the broken lines), ...])
MUTANTS = [
    ("advantage sign flipped",
     [("return ((r - mean) / (std + 1e-6)).flatten()", "return ((mean - r) / (std + 1e-6)).flatten()")]),
    ("advantage not divided by the group's std",
     [("return ((r - mean) / (std + 1e-6)).flatten()", "return (r - mean).flatten()")]),
    ("biased std in the advantage",
     [("std = r.std(dim=1, keepdim=True)", "std = r.std(dim=1, keepdim=True, unbiased=False)")]),
    ("every token of a conversation trained (prompt and passages too)",
     [('{"ids": c["ids"], "mask": c["mask"], "adv"', '{"ids": c["ids"], "mask": [1] * len(c["mask"]), "adv"')]),
    ("advantage only on each trajectory's final conversation",
     [('"adv": float(a)}', '"adv": float(a) if c is t["convs"][-1] else 0.0}')]),
    ("group copies not consecutive",
     [("questions = [q for q in mine for _ in range(cfg.group_size)]",
       "questions = [q for _ in range(cfg.group_size) for q in mine]")]),
    ("PPO ratio inverted",
     [("ratio = torch.exp(logp - old_logp)", "ratio = torch.exp(old_logp - logp)")]),
    ("PPO clip removed",
     [("clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)", "clipped = ratio")]),
    ("dual clip removed",
     [("pg = torch.where(a < 0, torch.min(pg, -dual_clip * a), pg)", "pg = pg")]),
    ("KL sign flipped",
     [("d = ref_logp - logp ", "d = logp - ref_logp ")]),
    ("loss divided by each micro-batch's own token count",
     [("adv, mask, max(1, n), cfg.clip_eps", "adv, mask, mask.sum(), cfg.clip_eps")]),
    ("zero-advantage rows left out of the token count",
     [('all_sum([sum(sum(r["mask"]) for r in minibatch) for',
       'all_sum([sum(sum(r["mask"]) for r in minibatch if needs_forward(r, cfg)) for')]),
    ("log-probs shifted by one position",
     [("h = hidden[:, :-1][predicts_trained]", "h = hidden[:, 1:][predicts_trained]")]),
    ("log-probs at temperature 1 everywhere",
     [("logits = head(h_chunk).float() / temperature", "logits = head(h_chunk).float()")]),
    ("rollout (old) log-probs at temperature 1",
     [("old_logps = [[logprobs(model, *b[:3]) if",
       "old_logps = [[token_logprobs(model, *b[:3], cfg.logprob_chunk) if")]),
    ("reference log-probs at temperature 1",
     [("ref_logps = [[logprobs(ref_model, *b[:3]) if",
       "ref_logps = [[token_logprobs(ref_model, *b[:3], cfg.logprob_chunk) if")]),
    ("sampler ignores the temperature",
     [("probs = torch.softmax(scores.float() / self.temperature, dim=-1)",
       "probs = torch.softmax(scores.float(), dim=-1)")]),
    ("prompt tokens trained",
     [('extend_conversation(t["convs"][-1], prompt, False)', 'extend_conversation(t["convs"][-1], prompt, True)')]),
    ("retrieved passages trained",
     [('extend_conversation(t["convs"][-1], user_turn, False)',
       'extend_conversation(t["convs"][-1], user_turn, True)')]),
    ("memory tokens not trained (mask 0)",
     [('                    extend_conversation(t["convs"][-1], ids, True)',
       '                    extend_conversation(t["convs"][-1], ids, False)')]),
    ("sampled action ids decoded and encoded again",
     [('# ended: not cut by --max-new-tokens\n            extend_conversation(t["convs"][-1], ids, True)',
       '# ended: not cut by --max-new-tokens\n            extend_conversation(t["convs"][-1], '
       'tokenizer(text, add_special_tokens=False).input_ids, True)')]),
    ("EOS dropped from the sampled ids",
     [("ids = ids if end is None else ids[:end + 1]", "ids = ids if end is None else ids[:end]")]),
    ("right padding in batched generate",
     [("input_ids[i, width - len(c):] = torch.tensor(c)", "input_ids[i, :len(c)] = torch.tensor(c)"),
      ("attention[i, width - len(c):] = 1", "attention[i, :len(c)] = 1")]),
    ("left padding in training",
     [('ids[i, :len(r["ids"])] = torch.tensor(r["ids"])', 'ids[i, width - len(r["ids"]):] = torch.tensor(r["ids"])'),
      ('attention[i, :len(r["ids"])] = 1', 'attention[i, width - len(r["ids"]):] = 1'),
      ('mask[i, :len(r["mask"])] = torch.tensor(', 'mask[i, width - len(r["mask"]):] = torch.tensor(')]),
    ("memory not carried to the next turn",
     [('t["memory"] = t["turns"][-1]["memory"] = memory', 't["turns"][-1]["memory"] = memory')]),
    ("MemSearcher keeps one growing context",
     [('if workflow == "memsearcher" or turn == 0:', "if turn == 0:")]),
    ("ReAct starts a fresh context every turn",
     [('if workflow == "memsearcher" or turn == 0:', "if True:")]),
    ("EM keeps the articles",
     [('text = re.sub(r"\\b(a|an|the)\\b", " ", text)', "text = text")]),
    ("EM keeps the punctuation",
     [('text = "".join(ch for ch in text if ch not in set(string.punctuation))', "text = text")]),
    ("rollout log-probs not frozen before the first update",
     [("old_logp = logp.detach() if old_logp is None else old_logp", "old_logp = logp.detach()")]),
    ("zero-advantage rows skipped even with a KL term",
     [('return row["adv"] != 0 or cfg.kl_coef > 0', 'return row["adv"] != 0')]),
    ("no optimizer step when every row is skipped",
     [("p.grad = torch.zeros_like(p)", "pass")]),
    ("clip fraction counts every ratio outside the band",
     [("clipped_here = (-clipped * a > -ratio * a).float()", "clipped_here = ((ratio - 1).abs() > clip_eps).float()")]),
    ("sampler's running sum in float32",
     [("cdf = probs.double().cumsum(dim=-1)", "cdf = probs.cumsum(dim=-1)")]),
    ("a search on MemSearcher's last turn is not read (its memory is not written)",
     [('elif workflow == "react" and turn == max_turns - 1:', "elif turn == max_turns - 1:")]),
    ("an empty memory keeps the trajectory going",
     [('if not content:                              # as in the official code',
       'if False:                                    # as in the official code')]),
    ("an answer whose turn ended with another end id counts",
     [('elif kind == "answer" and ids[-1] == end_of_turn:', 'elif kind == "answer":')]),
    ("an answer cut by the token limit counts as answered",
     [('            if not ended:\n                t["stop"] = "action_truncated"\n'
       '            elif kind == "answer" and ids[-1] == end_of_turn:\n'
       '                t["answer"], t["stop"] = content, "answered"\n',
       '            if kind == "answer":\n                t["answer"], t["stop"] = content, "answered"\n'
       '            elif not ended:\n                t["stop"] = "action_truncated"\n')]),
    ("the f1 reward without the official rule for <think>",
     [('if "<think>" not in t["turns"][len(t["convs"]) - 1]["action"]:', "if False:")]),
    ("the memory phase's output left out of its conversation",
     [('                    extend_conversation(t["convs"][-1], ids, True)\n', '')]),
    ("one injected token trained (the last of the user turn)",
     [('extend_conversation(t["convs"][-1], user_turn, False)',
       'extend_conversation(t["convs"][-1], user_turn[:-1], False); '
       'extend_conversation(t["convs"][-1], user_turn[-1:], True)')]),
    ("no check of the context against the model's positions",
     [('if len(t["convs"][-1]["ids"]) + max_new_tokens > model.config.max_position_embeddings:', "if False:")]),
    ("torchrun: the processes' gradients not summed",
     [("        sum_gradients(model)                # torchrun",
       "        pass                                # torchrun")]),
    ("torchrun: each process's token mean over its own rows",
     [("n_tokens = all_sum([sum(", "n_tokens = list([sum(")]),
    ("the reference in bf16 weights",
     [("ref_model.requires_grad_(False).eval()", "ref_model.requires_grad_(False).eval().to(torch.bfloat16)")]),
    ("no instruction to rewrite the memory after the passages",
     [('instruction = MEMORY_INSTRUCTION if workflow == "memsearcher" else ""', 'instruction = ""')]),
    ("the chat template's end of turn not an end id",
     [("eos = {*shipped, tokenizer.eos_token_id, turn_markers(tokenizer)[0]}",
       "eos = {*shipped, tokenizer.eos_token_id}")]),
    ("the model's shipped end ids ignored",
     [("eos = {*shipped, tokenizer.eos_token_id,", "eos = {tokenizer.eos_token_id,")]),
    ("the model's shipped sampling defaults kept",
     [("model.generation_config = GenerationConfig(do_sample=False, eos_token_id=sorted(eos),",
       "model.generation_config.update(do_sample=False, eos_token_id=sorted(eos),")]),
    ("a step's questions drawn from the shared random stream",
     [('rng = random.Random(f"questions {cfg.seed} {step}")', "rng = random")]),
]


# Tests of the documents (this file, docs/WORKSHOP.md) rather than of the method: a broken copy would fail them
# only because the lines they quote have changed.
DOC_TESTS = ["test_every_broken_variant_in_docs_mutants_applies_to_the_current_code",
             "test_the_workshop_runs_on_the_current_code"]


def apply(source, replacements):
    """The source with each (old, new) replaced; each old must occur exactly once."""
    for old, new in replacements:
        if source.count(old) != 1:
            raise ValueError(f"{old!r} occurs {source.count(old)} times in memsearcher.py, not once")
        source = source.replace(old, new)
    return source


def run(mutant, where, learning):
    """Apply one variant (None: none) in a copy of the repository at `where` and run the fast tier, or with
    `learning` the learning test -> (the failing tests, what the learning test printed, seconds)."""
    source = (ROOT / "memsearcher.py").read_text()
    (where / "memsearcher.py").write_text(apply(source, mutant[1]) if mutant else source)
    tests = ["-m", "slow", "-k", "test_grpo_lifts_greedy_em_over_the_imitator", "-s"] if learning else \
        ["-m", "not slow", *[f"--deselect=test_docs.py::{name}" for name in DOC_TESTS]]
    start = time.time()
    result = subprocess.run([sys.executable, "-m", "pytest", *tests, "-q", "-p", "no:cacheprovider", "--tb=no",
                             "-rf"], cwd=where, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    failed = sorted({re.sub(r"\[.*", "[...]", m) for m in re.findall(r"^FAILED \S+::(\S+)", result.stdout, re.M)})
    printed = re.findall(r"learning test: .*", result.stdout)
    return failed, printed[0] if printed else "", time.time() - start


def main(argv):
    learning = "--learning" in argv          # the slow learning test instead of the fast tier (~1.5 min each)
    numbers = [int(a) for a in argv if a != "--learning"]
    chosen = [(i, m) for i, m in enumerate(MUTANTS, 1) if not numbers or i in numbers]
    if learning:
        chosen.insert(0, (0, None))           # the code as it is, for the baseline
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp) / "repo"
        shutil.copytree(ROOT, where, ignore=shutil.ignore_patterns(".git", "runs", "__pycache__", "*.png"))
        holes = 0
        for i, mutant in chosen:
            failed, printed, seconds = run(mutant, where, learning)
            holes += mutant is not None and not failed
            name = mutant[0] if mutant else "as it is"
            verdict = ", ".join(failed) or ("passes" if mutant is None else "NOT CAUGHT")
            print(f"{i:2}. {name}: {len(failed)} failed in {seconds:.0f} s: {verdict}"
                  + (f"  ({printed})" if printed else ""), flush=True)
    print(f"{len(chosen) - learning - holes} of {len(chosen) - learning} broken variants caught")
    return holes


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
