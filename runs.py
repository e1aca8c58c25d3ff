"""The run of memsearcher.py: its folder (--output-dir), its processes under torchrun, what it logs and prints.
Plumbing, not the method.

A run folder holds run.json (the run's settings), metrics.jsonl (one line per GRPO step and per evaluation),
checkpoint-NNNNNN (model, tokenizer and optimizer) and `latest` (the newest checkpoint's name). What a run
promises, in the spirit of the usual trainers (TRL, accelerate, verl):
- one run at a time: a run holds a lock on its folder, which the OS drops if the process dies;
- refused before any work: open_run makes every check of the folder (writable, --resume's run, settings,
  steps and checkpoint) before the warm start or the index is built, and changes nothing of an earlier run;
  begin_run, called once everything is loaded, is the first to move or rewrite anything;
- nothing half-written, nothing lost: checkpoints, run.json and `latest` are written to a temporary name, then
  renamed; a step is never saved twice, and a save never deletes the checkpoint `latest` names before its
  replacement is in place. A kill at any moment leaves a folder that --resume accepts: open_run puts a
  complete copy that a killed save left back in place, then removes the rest of what it left (.tmp-*, .old-*);
- Ctrl-C or SIGTERM: the run finishes its step, saves a checkpoint and prints the command that continues it; a
  retrieval server that stays down: the same, with the server's error;
- a resumed run is the same run: --resume refuses settings that would change the result, and continues from
  the last checkpoint with the optimizer and the step counter (every step draws its random numbers from the
  seed and the step alone: memsearcher.begin_step), each step logged once however often the run was killed;
  it never renames or deletes a later checkpoint;
- resuming never runs code from the run folder: trainer_state.pt holds tensors and plain values only, and is
  read with torch.load(weights_only=True); anything else is refused;
- a new run in a used folder moves the earlier run's files to previous-<time>/ instead of mixing with them;
- under torchrun, the first process (rank 0) holds the folder, writes and prints; all of them stop after the
  same step, and a refusal or a retrieval failure in one is one in all.
"""
import atexit
import contextlib
import ctypes
import fcntl
import json
import os
import pickle
import re
import shlex
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from retriever import PAPER_BENCHMARKS, RetrievalError

# Settings that --resume may change; any other change would make it another run.
MAY_CHANGE_ON_RESUME = ["steps", "resume", "output_dir", "test_file", "eval_every", "eval_n", "eval_max_turns",
                        "save_every", "print_every", "retriever_url", "retriever_timeout", "retriever_retries",
                        "warm_start_dir", "rebuild_warm_start"]


class Run:
    """A training run in its folder, the way memsearcher.grpo_run uses it:

        with Run(cfg) as run:           # every check of the folder, then hold it; Ctrl-C and SIGTERM stop after a step
            ...                         # load the data and the policy (run.checkpoint: the one to resume from)
            run.begin(model, tokenizer, optimizer)   # resumed: the optimizer's state; new: an earlier run moved aside
            for step in run.steps():    # from 0 or the checkpoint's step, saved when they end
                run.evaluate(step, evaluation)       # logged and printed, and never twice for one step
                ...                     # the GRPO step
                run.log_step(...)
                run.save(step + 1)      # every --save-every steps
            run.evaluate(cfg.steps, evaluation)
            run.report()

    A retrieval server that stays down (RetrievalError) saves the steps done and stops with the command that
    continues the run."""

    def __init__(self, cfg):
        self.cfg = cfg

    def __enter__(self):
        self.exits = contextlib.ExitStack()
        out = start = refusal = None
        if rank() == 0:                             # the first process checks and holds the folder
            try:
                out, start, lock = open_run(self.cfg)
                self.exits.enter_context(lock)
            except SystemExit as err:
                refusal = str(err)
        self.out, self.start, refusal = broadcast((out, start, refusal))    # torchrun: the others take its answer
        if refusal:
            self.exits.close()
            raise SystemExit(refusal)
        self.checkpoint = latest_checkpoint(self.out) if self.cfg.resume else None
        self.stop = self.exits.enter_context(stop_requests())
        self.done, self.model = self.start, None    # steps taken; the policy, once begin() has it
        self.evaluations = {}                       # step -> (metrics, trajectories): this process's evaluations
        self.without_signal = 0                     # steps in a row in which no group's rewards differed
        return self

    def __exit__(self, kind, error, trace):
        try:
            if isinstance(error, RetrievalError) and self.model is not None:
                # A retrieval server that stays down must not cost the run: keep what was learned, say how to go on.
                path = self.save_now()
                raise SystemExit(f"{error}\nStopped: saved {path} after {self.done} steps. When the server is back, "
                                 f"continue with: {resume_command()}") from error
        finally:
            self.exits.close()

    def begin(self, model, tokenizer, optimizer):
        """Everything is loaded: a resumed run takes its optimizer's state, a new one moves an earlier run aside
        and writes run.json."""
        self.model, self.tokenizer, self.optimizer = model, tokenizer, optimizer
        if self.checkpoint:
            restore_trainer_state(optimizer, self.checkpoint)
            self.print(f"resumed from {self.checkpoint} at step {self.start}")
        if rank() == 0:
            begin_run(self.cfg, self.out, self.start)          # only now is an earlier run moved aside
        barrier()
        self.logged = logged_evaluations(self.out)             # step -> metrics: the evaluations the run has logged
        self.print(f"model {self.cfg.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters "
                   f"on {model.device}" + (f", in {world()} processes" if world() > 1 else ""))
        warning = memory_warning(model, self.cfg)
        if warning:
            self.print(warning)

    def steps(self):
        """The steps to take. After each, a stop request (Ctrl-C or SIGTERM, to any process) ends them; then the
        steps done are saved, and a stopped run says how to continue."""
        self.bar = tqdm(range(self.start, self.cfg.steps), desc="GRPO", unit="step", initial=self.start,
                        total=self.cfg.steps, disable=rank() > 0)
        for step in self.bar:
            yield step
            release_freed_memory()
            if any_rank(self.stop.is_set()):
                break
        path = self.save_now()
        if any_rank(self.stop.is_set()):
            raise SystemExit(f"Stopped: saved {path} after {self.done} steps. To continue: {resume_command()}")

    def evaluate(self, step, evaluation):
        """The evaluation at `step`, evaluation() -> (metrics, trajectories), logged and printed -> its metrics.
        One that the run logged before it was stopped is not run again. Step 0's comes with the pre-flight check:
        can GRPO learn anything at all here?"""
        if step not in self.logged:
            t0 = time.time()
            metrics, trajs = evaluation()
            release_freed_memory()
            self.log({"step": step, "eval": metrics, "eval_s": round(time.time() - t0, 1)})
            self.print(format_eval(step, metrics, per_benchmark=len(self.cfg.test_file) > 1))
            self.logged[step], self.evaluations[step] = metrics, (metrics, trajs)
        if step == 0 and step < self.cfg.steps and (warning := preflight(self.logged[0], self.cfg.reward)):
            self.print(warning)
        return self.logged[step]

    def log_step(self, step, stats, summary, example):
        """GRPO step `step` in metrics.jsonl (its stats and the summary of its rollouts), on the progress bar and,
        every --print-every steps, one of its trajectories; a warning when 3 steps in a row carry no signal."""
        logged = ["turns", "sampled_tokens", "answered", "stops", "context_tokens_per_turn"]
        self.log({"step": step, **stats, **{k: summary[k] for k in logged}})
        self.bar.set_postfix(reward=f"{stats['reward']:.3f}", mixed=f"{stats['mixed_groups']:.2f}")
        if self.cfg.print_every and step % self.cfg.print_every == 0:
            self.print(f"[step {step}] " + format_trajectory(example))
        no_signal = stats["mixed_groups"] == 0 and self.cfg.group_size > 1
        self.without_signal = self.without_signal + 1 if no_signal else 0
        if self.without_signal == 3:
            self.print(NO_SIGNAL.format(reward=stats["reward"]))

    def save(self, done):
        """`done` steps are taken: a checkpoint every --save-every steps."""
        self.done = done
        if self.cfg.save_every and done % self.cfg.save_every == 0:
            self.save_now()

    def save_now(self):
        """A checkpoint of the steps done (unless that step is saved already) -> its path."""
        if rank() == 0:
            save_checkpoint(self.model, self.tokenizer, self.optimizer, self.done, self.out)
        barrier()
        return self.out / f"checkpoint-{self.done:06d}"

    def report(self):
        """The end of the run: where its metrics are, and what GRPO changed (printed by `report`)."""
        if self.cfg.steps not in self.evaluations:
            self.print(f"the run in {self.out} is complete: its final evaluation is in {self.out / 'metrics.jsonl'}")
            return
        self.print(f"metrics in {self.out / 'metrics.jsonl'} (plot them: python docs/measure.py curves {self.out})")
        if rank() == 0:
            report(self.evaluations.get(0), self.evaluations[self.cfg.steps])   # a resumed run: no "before"

    def log(self, record):
        if rank() == 0:
            log_metrics(self.out, record)

    def print(self, text):
        if rank() == 0:
            tqdm.write(text)


# -----------------------------------------------------------------------------------------------------------
# The run folder.

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
    now, defaults = asdict(cfg), asdict(type(cfg)())
    # A setting added after the run began is not in its run.json: the run had that setting's default behaviour.
    then = {**{k: v for k, v in defaults.items() if k not in then}, **then}
    changed = [f"--{k.replace('_', '-')} {then[k]!r} -> {now.get(k)!r}" for k in then
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


# What Run relies on to make a resumed run the same run as one never
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


def save_checkpoint(model, tokenizer, optimizer, step, out):
    """out/checkpoint-NNNNNN (model, tokenizer, optimizer), then the `latest` pointer; then older checkpoints go
    (never a later one). A step that `latest` already names is not saved again: it holds these very weights, and
    writing them again would only cost time (--small's checkpoint is about 6 GB: 0.5B fp32 weights and AdamW's
    two moments). -> its path"""
    if (out / "latest").exists() and (out / "latest").read_text().strip() == f"checkpoint-{step:06d}":
        return out / f"checkpoint-{step:06d}"
    final = save_model(model, tokenizer, out / f"checkpoint-{step:06d}",
                       {"step": step, "optimizer": optimizer.state_dict()})
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
        state["step"], state["optimizer"]
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, KeyError, OSError) as err:
        raise SystemExit(f"--resume: {path} is damaged or was not written by memsearcher.py ({type(err).__name__}); "
                         "it was not loaded, since loading it could run code: resume only a run folder you trust, "
                         "or start a new run") from None
    return state


def restore_trainer_state(optimizer, checkpoint):
    state = read_trainer_state(checkpoint)
    optimizer.load_state_dict(state["optimizer"])
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
    launcher = ["torchrun", f"--nproc_per_node={os.environ['LOCAL_WORLD_SIZE']}"] if world() > 1 else ["python"]
    return shlex.join([*launcher, sys.argv[0], *args])


# -----------------------------------------------------------------------------------------------------------
# Several processes (torchrun --nproc_per_node N memsearcher.py): each runs the same code on its share of the
# questions. These are the few operations they need from each other; with one process each one is a no-op.

def start_processes():
    """Under torchrun: join the others (NCCL on CUDA, gloo on the CPU) and take this process's share of the CPU
    cores: processes that each use every core slow each other down many times over."""
    if "RANK" not in os.environ or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(os.environ["LOCAL_WORLD_SIZE"])))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    atexit.register(dist.destroy_process_group)


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier():
    if world() > 1:
        dist.barrier()


def broadcast(value):
    """Rank 0's `value` (any picklable value), on every process."""
    if world() == 1:
        return value
    sent = [value]
    dist.broadcast_object_list(sent, src=0)
    return sent[0]


def all_sum(values):
    """The sums of `values` (a list of numbers) over every process."""
    if world() == 1:
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(total)                         # SUM: gloo lacks AVG on older torch, and a sum is what we need
    return total.tolist()


def any_rank(flag):
    return all_sum([float(flag)])[0] > 0


def sum_gradients(model):
    """Every process's gradients, summed, in every process: the update of all their rows together. Called once
    per optimizer step, after every micro-batch, so it cannot hang on ranks with fewer micro-batches."""
    if world() == 1:
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)


def gather(items, per_question=1):
    """Every process's items, on every process, in the order one process would have them: process r holds
    questions r, r + N, r + 2N... of N processes, `per_question` items each (a question's G trajectories)."""
    if world() == 1:
        return items
    parts = [None] * world()
    dist.all_gather_object(parts, items)
    chunks = [[part[i:i + per_question] for i in range(0, len(part), per_question)] for part in parts]
    return [item for i in range(sum(map(len, chunks))) for item in chunks[i % world()][i // world()]]


def together(fn, *args, **kwargs):
    """fn(*args, **kwargs), called by every process at the same point. A RetrievalError in any process is one in
    every process: the others would otherwise wait forever for it at their next collective operation."""
    try:
        result, failure = fn(*args, **kwargs), None
    except RetrievalError as err:
        result, failure = None, err
    if any_rank(failure is not None):
        raise failure or RetrievalError("the retrieval failed in another process")
    return result


# -----------------------------------------------------------------------------------------------------------
# What the run prints: evaluations, trajectories, warnings.

NO_SIGNAL = ("warning: 3 steps in a row in which every group's rewards were equal (mean reward {reward:.2f}): every "
             "advantage is 0, so GRPO learns nothing. Likely causes: the model never answers right (an untrained "
             "or too small model, a too-hard task, a retriever that finds nothing) or always does; --group-size "
             "too small to see both; --max-new-tokens or --max-turns too small for the format.")


def preflight(m, reward):
    """The step-0 evaluation `m` (summarize's metrics) -> a warning if GRPO's first steps can hardly have any
    signal, else None.

    GRPO learns only from groups whose rewards differ. The evaluation is greedy, the policy's likeliest play, with
    more turns (--eval-max-turns) than training gets: when not one test trajectory answered, sampled ones rarely
    will, and both rewards give 0 to a trajectory that never answers; when none answered right, the em reward is
    0 everywhere too. (With --reward f1 an answered but wrong trajectory gets 0.1, so answering is enough.) Either
    way, nearly every group would be all zeros and its steps spent for nothing.
    """
    n = sum(m["stops"].values())
    answered, right = m["stops"].get("answered", 0), round(m["em"] * n)
    if answered and (right or reward == "f1"):
        return None
    why = ("no test trajectory answered, and a trajectory that never answers gets reward 0" if not answered else
           "none answered right, and with --reward em a wrong answer gets 0 as well")
    tries = ["a cold start that teaches the format first: on the toy world, --warm-steps N imitates its scripted "
             "expert before GRPO (--small does 300 steps, --smol 60, --tiny 3600)",
             *(["--reward f1, the official reward: 0.1 for any well-formed answer, so answering already pays"]
               if reward == "em" else []),
             "a larger model (the paper trains Qwen2.5-3B/7B-Instruct; models under 3B rarely learn from RL alone)",
             "more --max-turns or --max-new-tokens, if the stops above are mostly truncations or max_turns"]
    return "\n".join([f"warning: GRPO will very likely learn nothing here. Its step-0 evaluation (greedy): {answered} "
                      f"of {n} test trajectories answered, {right} right (stops {m['stops']}).",
                      f"GRPO learns only from groups whose rewards differ; {why}. To try:",
                      *(f"  - {t}" for t in tries),
                      "The run goes on (a later warning says so if whole steps have no signal)."])


def release_freed_memory():
    """Give back to the OS the memory that glibc's allocator keeps after tensors are freed. Tensors of up to 32 MB
    come from its heap, which it rarely shrinks: without this, a CPU run's resident memory grows from step to
    step by what the step freed. malloc_trim(0) takes milliseconds. Anywhere else, nothing."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):        # a Linux without glibc (musl): nothing to do
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def memory_warning(model, cfg):
    """On a CPU, a warning when training `model` would need more memory than the machine has free, else None.

    An estimate of one step's need, made before the work: per parameter, gradients 4 bytes and AdamW's two moments
    8 (the fp32 weights are loaded already), and 4 more for a reference model (with the KL term); then the
    activations a micro-batch keeps for the backward pass, about 96 bytes per token, layer and hidden unit
    (measured with SmolLM2-135M under bf16 autocast: 3.4 GB more peak memory from --micro-batch-tokens 2048 to
    4096), and 1 GB of working room. It is a floor: a step with many turns needs more. On a GPU, gradient
    checkpointing and the card's own memory make it another question."""
    meminfo = Path("/proc/meminfo")
    if model.device.type != "cpu" or not meminfo.exists():
        return None
    free_kb = int(re.search(r"MemAvailable:\s+(\d+)", meminfo.read_text()).group(1))
    params = sum(p.numel() for p in model.parameters())
    c = model.config
    need = (params * (16 if cfg.kl_coef > 0 else 12) + 2**30 +
            cfg.micro_batch_tokens * c.num_hidden_layers * c.hidden_size * 96)
    if need <= free_kb * 1024:
        return None
    return (f"warning: training {cfg.model} here needs at least {need / 2**30:.1f} GB more memory, and "
            f"{free_kb / 2**20:.1f} GB is free: the run may be killed for memory. Lower --micro-batch-tokens "
            f"({cfg.micro_batch_tokens}; each 1,000 tokens cost about "
            f"{1000 * c.num_hidden_layers * c.hidden_size * 96 / 2**30:.1f} GB here), or use a smaller model.")


def format_trajectory(t):
    """A whole trajectory, memory turn by turn, for the log."""
    q = t["question"]
    lines = [f"Q: {q['question']}   gold: {q['golden_answers']}"]
    for i, turn in enumerate(t["turns"], 1):
        lines.append(f"  turn {i} | memory: {turn['memory_before'] or '(empty)'}")
        lines.append(f"         | action: {' '.join(turn.get('action', '').split())}")   # on one line
        if "hits" in turn:
            lines.append(f"         | found:  {' / '.join(h['title'] for h in turn['hits'])}")
        if "memory_output" in turn:
            lines.append(f"         | wrote:  {' '.join(turn['memory_output'].split())}")
    lines.append(f"  -> {t['stop']}, answer {t['answer']!r}, reward {t['reward']}")
    return "\n".join(lines)


def report(before, after):
    """EM per question type and memory keeping before and after GRPO, how many test questions GRPO turned right
    and wrong, and one that it turned from wrong to right, turn by turn both times."""
    (start, start_trajs), (end, end_trajs) = before or (None, None), after
    if before is None:                                   # a resumed run has no evaluation from before GRPO
        print(f"\nafter GRPO: EM {end['em']:.3f}  by type {format_scores(end['em_by_type'])}")
        return
    print(f"\n{'':24}{'before GRPO':>12}{'after GRPO':>12}")
    for k in end["em_by_type"]:
        print(f"{'EM ' + k:24}{start['em_by_type'][k]:12.3f}{end['em_by_type'][k]:12.3f}")
    print(f"{'EM all':24}{start['em']:12.3f}{end['em']:12.3f}")
    if None not in (start["memory_keeping"], end["memory_keeping"]):
        print(f"{'memory keeping':24}{start['memory_keeping']:12.3f}{end['memory_keeping']:12.3f}")
    fixed = [i for i, (a, b) in enumerate(zip(start_trajs, end_trajs)) if a["reward"] < b["reward"]]
    broken = [i for i, (a, b) in enumerate(zip(start_trajs, end_trajs)) if a["reward"] > b["reward"]]
    print(f"\nGRPO turned {len(fixed)} of {len(end_trajs)} test questions from wrong to right and {len(broken)} "
          "from right to wrong.")
    if fixed:      # the one with the longest hop chain, where memory matters most
        i = max(fixed, key=lambda i: len(end_trajs[i]["question"].get("support", [])))
    else:
        i = 0
        print("(none went from wrong to right: here is the first test question)")
    print("\nThe same test question before GRPO:\n" + format_trajectory(start_trajs[i]))
    print("\nand after GRPO:\n" + format_trajectory(end_trajs[i]))


def format_eval(step, m, per_benchmark):
    """One evaluation for the log: EM overall and per type, turns, memory keeping, stops (and per benchmark)."""
    keeping = "-" if m["memory_keeping"] is None else f"{m['memory_keeping']:.3f}"
    line = (f"[eval step {step}] EM {m['em']:.3f}  by type {format_scores(m['em_by_type'])}  turns {m['turns']:.2f}"
            f"  memory keeping {keeping}  stops {m['stops']}")
    return line + ("\n" + benchmark_table(m["em_by_benchmark"]) if per_benchmark else "")


def benchmark_table(em_by_benchmark):
    """EM per benchmark in the paper's column order (others after, in file order), and their average."""
    order = list(dict.fromkeys(PAPER_BENCHMARKS.values()))
    names = sorted(em_by_benchmark, key=lambda k: order.index(k) if k in order else len(order))
    cells = [(k, em_by_benchmark[k]) for k in names]
    cells.append(("Avg", sum(em_by_benchmark.values()) / len(em_by_benchmark)))
    width = max(9, *(len(k) + 2 for k, _ in cells))
    return "".join(f"{k:>{width}}" for k, _ in cells) + "\n" + "".join(f"{v:>{width}.3f}" for _, v in cells)


def format_scores(d):
    """{"1-hop": 0.8123, ...} -> "{1-hop: 0.812, ...}" for the log."""
    return "{" + ", ".join(f"{k}: {v:.3f}" for k, v in d.items()) + "}"
