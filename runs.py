"""The run folder (--output-dir) of memsearcher.py: plumbing, not the method.

A run folder holds run.json (the run's settings), metrics.jsonl (one line per GRPO step and per evaluation),
checkpoint-NNNNNN (model, tokenizer, optimizer and RNG states) and `latest` (the newest checkpoint's name).
What it promises, in the spirit of the usual trainers (TRL, accelerate, verl):
- one run at a time: a run holds a lock on its folder, which the OS drops if the process dies;
- refused before any work: open_run makes every check of the folder (writable, --resume's run, settings,
  steps and checkpoint) before the warm start or the index is built, and changes nothing of an earlier run;
  begin_run, called once everything is loaded, is the first to move or rewrite anything;
- nothing half-written, nothing lost: checkpoints, run.json and `latest` are written to a temporary name, then
  renamed; a step is never saved twice, and a save never deletes the checkpoint `latest` names before its
  replacement is in place. A kill at any moment leaves a folder that --resume accepts: open_run puts a
  complete copy that a killed save left back in place, then removes the rest of what it left (.tmp-*, .old-*);
- Ctrl-C or SIGTERM: the run finishes its step, saves a checkpoint and prints the command that continues it;
- a resumed run is the same run: --resume refuses settings that would change the result, and continues from
  the last checkpoint with the optimizer, RNG states and step counter, each step logged once however often
  the run was killed; it never renames or deletes a later checkpoint;
- resuming never runs code from the run folder: trainer_state.pt holds tensors and plain values only, and is
  read with torch.load(weights_only=True); anything else is refused;
- a new run in a used folder moves the earlier run's files to previous-<time>/ instead of mixing with them.
"""
import contextlib
import fcntl
import json
import os
import pickle
import random
import shlex
import shutil
import signal
import sys
import threading
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
    """Every check of the run folder, before any work: take it for this process (a lock the OS drops if the
    process dies), repair what a killed save left, and check that --resume continues the same run. Nothing of an
    earlier run is moved or rewritten here (that is begin_run's). -> (folder, step to start from, the lock to
    hold while running)."""
    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock, holder = take_lock(out / ".lock")
    except OSError as err:
        raise SystemExit(f"--output-dir {out}: cannot write there ({err.strerror}): give a writable folder") from None
    if lock is None:
        raise SystemExit(f"--output-dir {out} is used by a running run (pid {holder or '?'}): wait for it to "
                         "finish, or give another --output-dir")
    tidy(out)
    return out, check_resume(cfg, out) if cfg.resume else 0, lock


def begin_run(cfg, out, start):
    """Once every check has passed and everything is loaded: a new run moves an earlier run's files to
    previous-<time>/ and writes run.json; a resumed run drops the metrics logged after its checkpoint."""
    if cfg.resume:
        records = [r for r in read_metrics(out) if r["step"] <= start]   # a kill can come after a log, before a save
        write_atomic(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        return
    earlier = [p for p in out.iterdir() if p.name in ("run.json", "metrics.jsonl", "latest", "curves.png")
               or p.name.startswith("checkpoint-")]
    if earlier:
        keep = out / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
        keep.mkdir()
        for p in earlier:
            os.replace(p, keep / p.name)
        print(f"{out} held an earlier run: moved it to {keep} (use --resume to continue a run instead)")
    write_atomic(out / "run.json", json.dumps(asdict(cfg), indent=1))


def take_lock(path, wait=False):
    """An exclusive lock on the file `path`, held while the returned file stays open; the OS drops it when the
    process dies. -> (the open file, None), or without `wait` (None, the holder's pid) if another process holds it."""
    lock = open(path, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip()
        lock.close()
        return None, holder
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    return lock, None


def tidy(folder, prefix=""):
    """Remove what killed saves left in `folder` (of names starting with `prefix`), after putting back a complete
    checkpoint that `latest` names and that is missing: a save killed between its two renames (save_model)."""
    pointer = folder / "latest"
    if pointer.exists() and not (folder / pointer.read_text().strip()).exists():
        name = pointer.read_text().strip()
        copies = [p for kind in (".tmp-", ".old-") for p in folder.glob(f"{kind}{name}-*")
                  if (p / "trainer_state.pt").exists()]            # written last: a complete checkpoint
        if copies:
            os.replace(copies[0], folder / name)
    for left in [*folder.glob(f".tmp-{prefix}*"), *folder.glob(f".old-{prefix}*")]:
        if left.is_dir():
            shutil.rmtree(left, ignore_errors=True)
        else:
            left.unlink(missing_ok=True)


def check_resume(cfg, out):
    """--resume: refuse anything but the same run, with a checkpoint that can be read safely -> its step."""
    if not (out / "run.json").exists():
        raise SystemExit(f"--resume: {out} holds no run (no run.json): start one without --resume")
    then = json.loads((out / "run.json").read_text())
    now = asdict(cfg)
    changed = [f"--{k.replace('_', '-')} {then[k]!r} -> {now[k]!r}" for k in then
               if k not in MAY_CHANGE_ON_RESUME and then[k] != now.get(k)]
    if changed:
        raise SystemExit(f"--resume: these settings differ from the run in {out}, which would make it another run: "
                         f"{'; '.join(changed)}. Use the run's settings (see {out / 'run.json'}), or a new run.")
    checkpoint = latest_checkpoint(out)
    step = read_trainer_state(checkpoint, mmap=True)["step"]        # refuses a damaged or tampered file now
    if cfg.steps < step:
        raise SystemExit(f"--steps {cfg.steps}: the run in {out} is already at step {step}; give --steps {step} or "
                         "more")
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


# What the training loop (memsearcher.grpo_run) relies on to make a resumed run the same run as one never
# stopped: each step is evaluated once (an evaluation logged before a kill is not run again, since begin_run
# kept the records up to the checkpoint), and saved once (a step whose checkpoint `latest` already names is
# not written again). So the loop can ask for an evaluation and a save wherever they are due, and the final
# evaluation of a run that had finished is found logged: the run is complete.

def logged_evaluations(out):
    """The evaluations that the run in `out` has logged in metrics.jsonl -> {step: metrics}."""
    return {r["step"]: r["eval"] for r in read_metrics(out) if "eval" in r}


def log_metrics(out, record):
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def write_atomic(path, text):
    tmp = Path(path).parent / f".tmp-{Path(path).name}-{os.getpid()}"     # its own name in each process
    tmp.write_text(text)
    os.replace(tmp, path)


def save_model(model, tokenizer, final, trainer_state=None):
    """save_pretrained into a temporary folder, renamed to `final` when complete: never half a model. An existing
    `final` is first renamed aside, not deleted: killed between the two renames, the folder still holds two
    complete copies (tidy puts one back)."""
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if trainer_state is not None:
        torch.save(trainer_state, tmp / "trainer_state.pt")       # last: its presence means a complete copy
    old = final.parent / f".old-{final.name}-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def rng_states():
    """The random states, as tensors and plain values (what torch.load(weights_only=True) reads)."""
    version, state, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": [version, list(state), gauss],
              "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    torch.set_rng_state(states["torch"])
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))
    keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(model, tokenizer, optimizer, step, out, rng=None):
    """out/checkpoint-NNNNNN (model, tokenizer, optimizer, RNG states: now's, or `rng`), then the `latest`
    pointer; then older checkpoints go (never a later one). A step that `latest` already names is not saved again:
    it holds these very weights, and writing them again would only cost time (--small's checkpoint is about 6 GB:
    0.5B fp32 weights and AdamW's two moments). -> its path"""
    if (out / "latest").exists() and (out / "latest").read_text().strip() == f"checkpoint-{step:06d}":
        return out / f"checkpoint-{step:06d}"
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
        raise SystemExit(f"--resume: no checkpoint in {out} (no 'latest' file there): start a new run without "
                         "--resume")
    checkpoint = Path(out) / pointer.read_text().strip()
    if not (checkpoint / "trainer_state.pt").exists():
        raise SystemExit(f"--resume: {pointer} names {checkpoint.name}, which is missing or incomplete: start a "
                         "new run without --resume")
    return checkpoint


def read_trainer_state(checkpoint, mmap=False):
    """trainer_state.pt, read without running any code it may hold (weights_only): a file that needs more, or
    is damaged, is refused."""
    path = Path(checkpoint) / "trainer_state.pt"
    try:
        state = torch.load(path, weights_only=True, mmap=mmap)
        state["step"], state["optimizer"], state["rng"]
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, KeyError, OSError) as err:
        raise SystemExit(f"--resume: {path} is damaged or was not written by memsearcher.py ({type(err).__name__}); "
                         "it was not loaded, since loading it could run code: resume only a run folder you trust, "
                         "or start a new run") from None
    return state


def restore_trainer_state(optimizer, checkpoint):
    state = read_trainer_state(checkpoint)
    optimizer.load_state_dict(state["optimizer"])
    set_rng_states(state["rng"])
    return state["step"]


@contextlib.contextmanager
def stop_requests():
    """While training: Ctrl-C or SIGTERM sets the yielded event, so that the run finishes its step (a step cut in
    the middle would leave the weights half-updated), saves a checkpoint and stops. A second Ctrl-C stops at once."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():    # only the main thread may set handlers
        yield stop
        return

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print(f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint of every step done "
              "(Ctrl-C again stops at once, losing the steps since the last checkpoint)", file=sys.stderr, flush=True)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def resume_command():
    """The command that continues this run: the same command, with --resume."""
    args = sys.argv[1:] + ([] if "--resume" in sys.argv else ["--resume"])
    return shlex.join(["python", sys.argv[0], *args])
