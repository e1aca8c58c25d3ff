"""The run folder (--output-dir) of memsearcher.py: plumbing, not the method.

A run folder holds run.json (the run's settings), metrics.jsonl (one line per GRPO step and per evaluation),
checkpoint-NNNNNN (model, tokenizer, optimizer and RNG states) and `latest` (the newest checkpoint's name).
What it promises, in the spirit of the usual trainers (TRL, accelerate, verl):
- one run at a time: a run holds a lock on its folder, which the OS drops if the process dies;
- nothing half-written: checkpoints, run.json and `latest` are written to a temporary name, then renamed;
  a killed save leaves only a .tmp-* folder, removed by the next run in the folder;
- a resumed run is the same run: --resume refuses settings that would change the result, and continues from
  the last checkpoint with the optimizer, RNG states and step counter, each step logged once however often
  the run was killed; it never renames or deletes a later checkpoint;
- a new run in a used folder moves the earlier run's files to previous-<time>/ instead of mixing with them.
"""
import fcntl
import json
import os
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

# Settings that --resume may change; any other change would make it another run.
MAY_CHANGE_ON_RESUME = ["steps", "resume", "output_dir", "test_file", "eval_every", "eval_n", "eval_max_turns",
                        "save_every", "print_every", "retriever_url", "retriever_timeout", "retriever_retries",
                        "warm_start_dir", "rebuild_warm_start"]


def open_run(cfg):
    """Take the run folder for this process (a lock the OS drops if the process dies), remove what a killed save
    left, then start a new run (an earlier run's files move to previous-<time>/) or check that --resume continues
    the same run. -> (folder, step to start from, the lock to hold while running)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / ".lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        raise SystemExit(f"--output-dir {out} is used by a running run (pid {lock.read().strip() or '?'}): wait "
                         "for it to finish, or give another --output-dir") from None
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    for tmp in out.glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    if cfg.resume:
        return out, check_resume(cfg, out), lock
    earlier = [p for p in out.iterdir() if p.name in ("run.json", "metrics.jsonl", "latest", "curves.png")
               or p.name.startswith("checkpoint-")]
    if earlier:
        keep = out / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
        keep.mkdir()
        for p in earlier:
            os.replace(p, keep / p.name)
        print(f"{out} held an earlier run: moved it to {keep} (use --resume to continue a run instead)")
    write_atomic(out / "run.json", json.dumps(asdict(cfg), indent=1))
    return out, 0, lock


def check_resume(cfg, out):
    """--resume: refuse anything but the same run, then drop metrics logged after its checkpoint -> its step."""
    if not (out / "run.json").exists():
        raise SystemExit(f"--resume: {out} holds no run (no run.json): start one without --resume")
    then = json.loads((out / "run.json").read_text())
    now = asdict(cfg)
    changed = [f"--{k.replace('_', '-')} {then[k]!r} -> {now[k]!r}" for k in then
               if k not in MAY_CHANGE_ON_RESUME and then[k] != now.get(k)]
    if changed:
        raise SystemExit(f"--resume: these settings differ from the run in {out}, which would make it another run: "
                         f"{'; '.join(changed)}. Use the run's settings (see {out / 'run.json'}), or a new run.")
    step = int(latest_checkpoint(out).name.split("-")[1])
    if cfg.steps < step:
        raise SystemExit(f"--steps {cfg.steps}: the run in {out} is already at step {step}; give --steps {step} or "
                         "more")
    records = [r for r in read_metrics(out) if r["step"] <= step]     # a kill can come after a log, before a save
    write_atomic(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    return step


def read_metrics(out):
    """metrics.jsonl's records; a line cut short by a kill is dropped."""
    if not (out / "metrics.jsonl").exists():
        return []
    records = []
    for line in open(out / "metrics.jsonl"):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


def log_metrics(out, record):
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def write_atomic(path, text):
    tmp = Path(f"{path}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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


def rng_states():
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def save_checkpoint(model, tokenizer, optimizer, step, out, rng=None):
    """out/checkpoint-NNNNNN (model, tokenizer, optimizer, RNG states: now's, or `rng`), then the `latest`
    pointer; then older checkpoints go (never a later one)."""
    final = save_model(model, tokenizer, out / f"checkpoint-{step:06d}",
                       {"step": step, "optimizer": optimizer.state_dict(), "rng": rng or rng_states()})
    write_atomic(out / "latest", final.name)
    for old in out.glob("checkpoint-*"):
        if int(old.name.split("-")[1]) < step:
            shutil.rmtree(old)
    return final


def latest_checkpoint(out):
    pointer = Path(out) / "latest"
    if not pointer.exists():
        raise SystemExit(f"--resume: no checkpoint in {out} (no 'latest' file there)")
    checkpoint = Path(out) / pointer.read_text().strip()
    if not (checkpoint / "trainer_state.pt").exists():
        raise SystemExit(f"--resume: {pointer} names {checkpoint.name}, which is missing or incomplete")
    return checkpoint


def restore_trainer_state(optimizer, checkpoint):
    state = torch.load(Path(checkpoint) / "trainer_state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    return state["step"]
