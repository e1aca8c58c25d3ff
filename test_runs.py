"""Tests for runs.py, the run folder: checks before any work, checkpoints that survive a kill, Ctrl-C, --resume.

    HF_HUB_OFFLINE=1 python -m pytest -q test_runs.py

Each resume test trains for real: trajectory_reward is replaced by a deterministic function that gives groups
mixed rewards (a random tiny model never answers right), so that weights move, and a resumed run must equal the
uninterrupted one exactly: the same weights and optimizer state on the same CPU, and each step's random draws
seeded from the step, give the same numbers.
"""
import contextlib
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file

import data.warm_start as warm
import memsearcher as ms
import retriever as r
import runs
from conftest import parity_reward, parse_args, quick_config, tiny_config, train

ROOT = Path(__file__).parent


def logged_steps(out):
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return [r["step"] for r in records if "reward" in r], [r["step"] for r in records if "eval" in r]


def test_a_new_run_moves_an_earlier_run_aside(tmp_path):
    out = tmp_path / "run"
    train(quick_config(out))
    train(quick_config(out, seed=1))
    previous, = out.glob("previous-*")
    assert (previous / "latest").read_text().strip() == "checkpoint-000002" and (previous / "metrics.jsonl").exists()
    assert json.loads((out / "run.json").read_text())["seed"] == 1 and logged_steps(out) == ([1, 2], [0, 2])


def test_resume_refuses_another_runs_settings_and_fewer_steps(tmp_path):
    out = tmp_path / "run"
    train(quick_config(out, steps=2, save_every=1))
    with pytest.raises(SystemExit, match=r"--resume: .*--seed 0 -> 1; --reward 'em' -> 'f1'; --lr 0.0003 -> 0.1"):
        train(quick_config(out, steps=3, resume=True, seed=1, lr=0.1, reward="f1"))
    with pytest.raises(SystemExit, match="--steps 1: the run .* is already at step 2"):
        train(quick_config(out, steps=1, resume=True))
    assert (out / "latest").read_text().strip() == "checkpoint-000002" and (out / "checkpoint-000002").is_dir()
    (out / "latest").write_text("checkpoint-000009")
    with pytest.raises(SystemExit, match="names checkpoint-000009, which is missing"):
        train(quick_config(out, steps=3, resume=True))


def test_resume_checks_settings_added_after_the_run_began(tmp_path):
    """A run.json written before a setting existed holds no value for it: the run had the setting's default, and
    --resume with another value is another run."""
    out = tmp_path / "run"
    train(quick_config(out, steps=1))
    record = json.loads((out / "run.json").read_text())
    del record["cpu_bf16"]
    (out / "run.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit, match=r"--resume: .*--cpu-bf16 False -> True"):
        train(quick_config(out, steps=2, resume=True, cpu_bf16=True))
    train(quick_config(out, steps=2, resume=True))
    assert logged_steps(out) == ([1, 2], [0, 1, 2])


def test_one_run_per_folder(tmp_path):
    cfg = quick_config(tmp_path / "run")
    _, _, lock = runs.open_run(cfg)
    with pytest.raises(SystemExit, match=f"used by a running run \\(pid {os.getpid()}\\)"):
        runs.open_run(cfg)
    lock.close()                                            # what the OS does when a run dies
    runs.open_run(ms.Config(**{**asdict(cfg), "resume": False}))


@pytest.mark.slow
def test_resume_after_a_kill_logs_every_step_once(tmp_path, learning, reference_runs):
    out = tmp_path / "run"
    train(quick_config(out, steps=2, save_every=1))
    with open(out / "metrics.jsonl", "a") as f:            # killed after logging step 3, before its checkpoint
        f.write(json.dumps({"step": 3, "reward": 0.0}) + "\n" + '{"step": 4, "rew')
    (out / ".tmp-checkpoint-000003-999").mkdir()            # and in the middle of saving it
    train(quick_config(out, steps=4, save_every=1, resume=True))
    assert logged_steps(out) == ([1, 2, 3, 4], [0, 2, 4])
    assert_same_run(out, reference_runs(4, save_every=1))
    assert not list(out.glob(".tmp-*")) and sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-000004"]
    final = runs.logged_evaluations(out)[4]
    assert train(quick_config(out, steps=4, resume=True)) == final   # complete: its final evaluation, as logged
    assert logged_steps(out) == ([1, 2, 3, 4], [0, 2, 4])           # and nothing run or logged again


@pytest.mark.slow
def test_a_resumed_run_with_the_kl_term_and_two_updates_is_the_same_run(tmp_path, learning, reference_runs):
    """--small's update (the frozen reference loaded again from the initial policy, the rollout policy's
    log-probs for the second update), stopped after a step and resumed."""
    out, small = tmp_path / "run", dict(kl_coef=0.1, updates_per_step=2, save_every=1)
    train(quick_config(out, steps=1, **small))
    train(quick_config(out, steps=2, resume=True, **small))
    assert logged_steps(out) == ([1, 2], [0, 1, 2])                  # the first process ended with an evaluation
    assert_same_run(out, reference_runs(2, **small))
    assert all(rec["kl"] > 0 for rec in runs.read_metrics(out) if rec.get("step") == 2 and "reward" in rec)


def test_resume_after_a_retrieval_failure_at_step_0_evaluates_once(tmp_path, monkeypatch, learning, reference_runs):
    out = tmp_path / "run"
    real_rollout = ms.rollout

    def failing(*args, **kwargs):
        if not kwargs.get("greedy"):
            raise r.RetrievalError("retrieval server http://x/retrieve failed after 4 attempts")
        return real_rollout(*args, **kwargs)

    monkeypatch.setattr(ms, "rollout", failing)
    with pytest.raises(SystemExit, match="after 0 steps"):
        train(quick_config(out))
    monkeypatch.setattr(ms, "rollout", real_rollout)
    train(quick_config(out, resume=True))
    assert logged_steps(out) == ([1, 2], [0, 2])
    assert_same_run(out, reference_runs(2))


def test_no_learning_signal_is_reported(tmp_path, monkeypatch, capsys):
    real_step = ms.grpo_step
    monkeypatch.setattr(ms, "grpo_step", lambda *a: (lambda trajs, stats: (trajs, {**stats, "mixed_groups": 0.0}))(
        *real_step(*a)))
    train(quick_config(tmp_path / "run", steps=3))
    assert capsys.readouterr().out.count("every group's rewards were equal") == 1


PREFLIGHT = "GRPO will very likely learn nothing here"


def print_metric_lines(monkeypatch):
    """Print each metrics.jsonl line as it is written, so that the captured output shows what came before it."""
    real_log = runs.log_metrics
    monkeypatch.setattr(runs, "log_metrics", lambda out, record: print(f"metrics line: step {record['step']}"
                                                                      f"{' eval' if 'eval' in record else ''}")
                        or real_log(out, record))


def test_a_run_that_cannot_learn_says_so_before_its_first_step(tmp_path, monkeypatch, capsys):
    print_metric_lines(monkeypatch)
    train(quick_config(tmp_path / "run"))               # a random tiny model never answers
    out = capsys.readouterr().out
    assert out.count(PREFLIGHT) == 1
    assert out.index("metrics line: step 0 eval") < out.index(PREFLIGHT) < out.index("metrics line: step 1\n")
    assert "0 of 2 test trajectories answered, 0 right" in out and "--reward f1" in out and "--warm-steps" in out


def test_the_pre_flight_warning_depends_on_the_step_0_answers_and_the_reward(tmp_path, monkeypatch, capsys):
    real_evaluate = ms.evaluate
    warned = []
    for i, (reward, em) in enumerate([("em", 0.0), ("f1", 0.0), ("em", 0.5)]):
        def answered(*args, em=em):                     # one of the two test questions answered, `em` right
            metrics, trajs = real_evaluate(*args)
            return {**metrics, "em": em, "stops": {"answered": 1, "action_truncated": 1}}, trajs

        monkeypatch.setattr(ms, "evaluate", answered)
        train(quick_config(tmp_path / f"run{i}", reward=reward))
        warned.append(PREFLIGHT in capsys.readouterr().out)
    # answered, none right: em gives every trajectory 0, f1 gives the answered ones 0.1; some right: signal
    assert warned == [True, False, False]


def test_a_resumed_run_takes_the_pre_flight_verdict_from_its_logged_step_0_evaluation(tmp_path, monkeypatch,
                                                                                      capsys):
    out = tmp_path / "run"
    train(quick_config(out, steps=0))                   # evaluates at step 0 and keeps checkpoint-000000
    capsys.readouterr()
    evaluations = []
    real_evaluate = ms.evaluate
    monkeypatch.setattr(ms, "evaluate", lambda *a: evaluations.append(1) or real_evaluate(*a))
    train(quick_config(out, steps=1, resume=True))
    assert PREFLIGHT in capsys.readouterr().out and len(evaluations) == 1      # only the final one, at step 1
    assert logged_steps(out) == ([1], [0, 1])


def logged_steps_so_far(out):
    return [rec["step"] for rec in runs.read_metrics(out) if "reward" in rec]


@pytest.mark.slow
def test_a_run_stopped_by_ctrl_c_then_killed_at_random_points_is_the_run_never_stopped(tmp_path, learned):
    """A real run that learns (the learning test's model after GRPO, with the F1 reward: its rewards vary), from
    the command line. Ctrl-C after its first step: it saves and prints the command that continues. That command,
    killed with SIGKILL at random moments and run again each time, ends with each step and each evaluation
    logged once, one checkpoint, and the metrics, evaluations and weights of the same run never stopped."""
    cfg, _, _ = learned
    args = ["--tiny", "--model", str(runs.latest_checkpoint(cfg.output_dir)), "--train-file", cfg.train_file[0],
            "--test-file", cfg.test_file[0], "--corpus", cfg.corpus, "--steps", "4", "--save-every", "1",
            "--group-size", "4", "--questions-per-step", "4", "--eval-n", "4", "--eval-every", "2",
            "--max-turns", "4", "--eval-max-turns", "4", "--reward", "f1", "--print-every", "0"]
    out = tmp_path / "stopped"
    command = [sys.executable, str(ROOT / "memsearcher.py"), *args, "--output-dir", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(tmp_path / "err", "w") as err:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
        while process.poll() is None and not logged_steps_so_far(out):
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 1
    message = (tmp_path / "err").read_text().strip().splitlines()[-1]
    step = len(logged_steps_so_far(out))
    assert step < 4 and message == (f"Stopped: saved {out}/checkpoint-{step:06d} after {step} steps. To continue: "
                                    + shlex.join(["python", *command[1:], "--resume"]))
    assert (out / "latest").read_text().strip() == f"checkpoint-{step:06d}"
    to_continue = [sys.executable, *shlex.split(message.split("To continue: ")[1])[1:]]
    rng, kills = random.Random(0), 0
    for attempt in range(80):
        process = subprocess.Popen(to_continue, cwd=ROOT, text=True, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL)
        target = len(runs.read_metrics(out)) + rng.randint(1, 2)    # kill once a line or two more are logged,
        while process.poll() is None and len(runs.read_metrics(out)) < target:      # a moment later
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.3))
        if process.poll() is None:
            process.kill()
            process.communicate()
            kills += 1
            continue
        assert process.returncode == 0
        break
    assert kills >= 2 and "resumed from" in process.communicate()[0]
    assert logged_steps(out) == ([1, 2, 3, 4], [0, 2, 4])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-000004"]
    never_stopped = tmp_path / "never-stopped"
    ms.main([*args, "--output-dir", str(never_stopped)])            # the same command, in this process
    assert_same_run(out, never_stopped)
    assert runs.logged_evaluations(out) == runs.logged_evaluations(never_stopped)
    assert sum(rec["mixed_groups"] > 0 for rec in runs.read_metrics(out) if "reward" in rec) >= 3


# ------------------------------------------------------------------------------- resumed runs train for real ---

@pytest.fixture
def learning(monkeypatch):
    monkeypatch.setattr(ms, "trajectory_reward", parity_reward)


def step_metrics(out):
    return [(rec["step"], rec["reward"], rec["loss"], rec["grad_norm"]) for rec in runs.read_metrics(out)
            if "reward" in rec]


def final_weights(out):
    return load_file(runs.latest_checkpoint(out) / "model.safetensors")


def assert_same_run(out, reference):
    """The same metrics at every step and the same final weights, exactly."""
    assert step_metrics(out) == step_metrics(reference)
    mine, theirs = final_weights(out), final_weights(reference)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory):
    """Uninterrupted runs that learn (mixed rewards), by number of steps: what resumed runs must equal."""
    made = {}

    def run(steps, **overrides):
        key = (steps, *sorted(overrides.items()))
        if key not in made:
            out = tmp_path_factory.mktemp("reference") / "run"
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(ms, "trajectory_reward", parity_reward)
                train(quick_config(out, steps=steps, **overrides))
            made[key] = out
        return made[key]
    return run


def test_the_reference_run_learns(reference_runs):
    records = [rec for rec in runs.read_metrics(reference_runs(3)) if "reward" in rec]
    assert any(rec["mixed_groups"] > 0 and rec["grad_norm"] > 0 for rec in records)
    start = load_file(Path(warm.tiny_policy(quick_config(reference_runs(3)))) / "model.safetensors")
    assert any(not torch.equal(start[k], w) for k, w in final_weights(reference_runs(3)).items())


# ------------------------------------------------------------------------------- a kill at any point of a save ---

@pytest.mark.slow
def test_a_kill_at_any_point_of_the_final_save_leaves_a_run_that_resumes(tmp_path, monkeypatch, learning,
                                                                          reference_runs):
    """The folder as a kill would leave it before each rename or delete of the final save (--save-every dividing
    --steps): --resume accepts it and ends with the uninterrupted run."""
    out = tmp_path / "run"
    snapshots = []

    def snapshot_before(real):
        def call(path, *args, **kwargs):
            if Path(path).parent == out and 2 in logged_steps_so_far(out):
                snapshots.append(tmp_path / f"killed-{len(snapshots)}")
                shutil.copytree(out, snapshots[-1])
            return real(path, *args, **kwargs)
        return call

    monkeypatch.setattr(runs.os, "replace", snapshot_before(os.replace))
    monkeypatch.setattr(runs.shutil, "rmtree", snapshot_before(shutil.rmtree))
    train(quick_config(out, steps=2, save_every=1))
    monkeypatch.undo()
    monkeypatch.setattr(ms, "trajectory_reward", parity_reward)
    assert len(snapshots) >= 3
    for killed in snapshots:
        train(quick_config(killed, steps=2, save_every=1, resume=True))
        assert logged_steps(killed) == ([1, 2], [0, 2])
        assert_same_run(killed, reference_runs(2, save_every=1))


def test_a_complete_copy_left_by_a_killed_save_is_put_back_not_removed(tmp_path, learning, reference_runs):
    out = tmp_path / "run"
    train(quick_config(out, steps=2, save_every=1))
    os.replace(out / "checkpoint-000002", out / ".tmp-checkpoint-000002-999")   # killed between the two renames
    train(quick_config(out, steps=3, save_every=1, resume=True))
    assert logged_steps(out) == ([1, 2, 3], [0, 2, 3])
    assert_same_run(out, reference_runs(3, save_every=1))
    assert not list(out.glob(".tmp-*")) and not list(out.glob(".old-*"))


# ------------------------------------------------------------------------------------- refused before any work ---

def test_a_cpu_run_that_needs_more_memory_than_is_free_is_warned_before_the_work(tiny):
    """The estimate grows with --micro-batch-tokens; the tiny preset needs far less than any machine has."""
    cfg, model, _ = tiny
    assert runs.memory_warning(model, cfg) is None
    free_kb = int(Path("/proc/meminfo").read_text().split("MemAvailable:")[1].split()[0])
    per_token = model.config.num_hidden_layers * model.config.hidden_size * 96
    too_many = ms.Config(**{**asdict(cfg), "micro_batch_tokens": free_kb * 1024 // per_token + 1})
    warning = runs.memory_warning(model, too_many)
    assert "may be killed for memory" in warning and f"--micro-batch-tokens ({too_many.micro_batch_tokens}" in warning


def resident_mb():
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists() or "MALLOC_MMAP_THRESHOLD_" in os.environ,
                    reason="glibc's heap, on Linux")
def test_memory_that_a_step_freed_goes_back_to_the_os(tmp_path, monkeypatch):
    """Tensors of a few MB come from glibc's heap once a larger one has been freed, and stay resident after they
    are freed: release_freed_memory gives them back. A run calls it after every step and every evaluation."""
    big = torch.ones(2**22)                   # 16 MB, mapped on its own: freeing it raises glibc's mmap threshold
    del big
    tensors = [torch.ones(2**20) for _ in range(100)]                 # 100 x 4 MB, from the heap
    kept = tensors[-1]                        # the heap's top stays in use: only a trim gives the rest back
    del tensors
    before = resident_mb()
    runs.release_freed_memory()
    assert before - resident_mb() > 300 and kept.sum() == 2**20
    calls = []
    monkeypatch.setattr(runs, "release_freed_memory", lambda: calls.append(1))
    train(quick_config(tmp_path / "run"))
    assert logged_steps(tmp_path / "run") == ([1, 2], [0, 2]) and len(calls) == 2 + 2


def test_what_can_be_checked_is_refused_before_any_work(tmp_path, monkeypatch):
    """Each refusal comes before the warm start or the index is built, and leaves the earlier run as it was."""
    out, warm_dir = tmp_path / "run", tmp_path / "warm"
    base = ["--tiny", "--output-dir", str(out), "--warm-start-dir", str(warm_dir), "--pretrain-steps", "0",
            "--warm-steps", "0", "--group-size", "2", "--questions-per-step", "2", "--eval-n", "2",
            "--max-new-tokens", "8", "--max-turns", "2", "--eval-max-turns", "2", "--eval-every", "0",
            "--print-every", "0", "--save-every", "1"]
    ms.main(base + ["--steps", "2"])
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}

    def work(*args, **kwargs):
        raise AssertionError("work started before every check was made")

    monkeypatch.setattr(warm, "tiny_policy", work)
    monkeypatch.setattr(ms, "local_searcher", work)
    bad_test = tmp_path / "test.jsonl"
    bad_test.write_text('{"question": "q?"}\n')
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    refusals = [
        (["--steps", "3", "--resume", "--output-dir", str(tmp_path / "empty")], "holds no run"),
        (["--steps", "3", "--resume", "--seed", "1"], "--seed 0 -> 1"),
        (["--steps", "1", "--resume"], "--steps 1: the run .* is already at step 2"),
        (["--steps", "3", "--test-file", str(bad_test)], "test.jsonl:1"),
        (["--steps", "3", "--seed", "-1"], "--seed must be between 0 and 2\\*\\*32 - 1"),
        (["--steps", "3", "--output-dir", str(a_file)], "--output-dir .*a-file: cannot write there"),
        (["--steps", "3", "--output-dir", str(a_file / "run")], "--output-dir .*a-file/run: cannot write there"),
        (["--steps", "3", "--model", str(tmp_path / "no-model"), "--pretrain-steps", "0", "--warm-steps", "0"],
         "--model .*no-model: no such folder"),
        (["--steps", "3", "--model", "./no-model", "--pretrain-steps", "0", "--warm-steps", "0"],
         "--model ./no-model: no such folder"),
        (["--steps", "3", "--tiny-hidden", "2"], "--tiny-hidden must be a multiple of 8"),
    ]
    for args, message in refusals:
        with pytest.raises(SystemExit, match=message):
            ms.main(base + args)
    (out / "latest").write_text("checkpoint-000009")
    with pytest.raises(SystemExit, match="names checkpoint-000009, which is missing"):
        ms.main(base + ["--steps", "3", "--resume"])
    (out / "latest").write_text("checkpoint-000002")
    state = out / "checkpoint-000002" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    with pytest.raises(SystemExit, match="trainer_state.pt is damaged"):
        ms.main(base + ["--steps", "3", "--resume"])
    state.write_bytes(before[state.relative_to(out)])
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    assert after == before and not list(out.glob("previous-*"))
    assert parse_args(["--model", "Qwen/Qwen2.5-0.5B-Instruct"]).model == "Qwen/Qwen2.5-0.5B-Instruct"


def test_steps_0_evaluates_once(tmp_path):
    out = tmp_path / "run"
    train(quick_config(out, steps=0))
    assert logged_steps(out) == ([], [0]) and (out / "latest").read_text().strip() == "checkpoint-000000"


def test_a_step_is_saved_once(tmp_path, monkeypatch):
    out, saved, real_save = tmp_path / "run", [], runs.save_model
    monkeypatch.setattr(runs, "save_model", lambda model, tokenizer, final, state=None:
                        saved.append(final.name) or real_save(model, tokenizer, final, state))
    train(quick_config(out, steps=2, save_every=2))     # step 2's save is also the end of the run's
    train(quick_config(out, steps=2, resume=True))      # a finished run, resumed: nothing new to save
    assert saved == ["checkpoint-000002"] and (out / "latest").read_text().strip() == "checkpoint-000002"


# ------------------------------------------------------------------------------- Ctrl-C, SIGTERM, failures ---

@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_saves_the_steps_done_and_the_resumed_run_is_the_same_run(tmp_path, monkeypatch, capsys, learning,
                                                                        reference_runs, signum):
    out = tmp_path / "run"
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}   # SIG_IGN in a background job

    real_log = runs.log_metrics

    def log_then_stop(folder, record):
        real_log(folder, record)
        if record.get("step") == 1 and "reward" in record:
            os.kill(os.getpid(), signum)                   # as Ctrl-C or `kill` would, in the middle of a step

    monkeypatch.setattr(runs, "log_metrics", log_then_stop)
    with pytest.raises(SystemExit, match=r"Stopped: saved .*checkpoint-000001 after 1 steps. To continue: python "
                                         r".* --resume$"):
        train(quick_config(out, steps=3))
    assert "stopping after this step" in capsys.readouterr().err
    assert (out / "latest").read_text().strip() == "checkpoint-000001"
    monkeypatch.setattr(runs, "log_metrics", real_log)
    train(quick_config(out, steps=3, resume=True))
    assert logged_steps(out) == ([1, 2, 3], [0, 3])
    assert_same_run(out, reference_runs(3))
    assert {s: signal.getsignal(s) for s in handlers} == handlers                # the handlers are put back


def test_a_retrieval_failure_in_the_step_0_evaluation_saves_and_resumes(tmp_path, monkeypatch, learning,
                                                                       reference_runs):
    out, real_rollout = tmp_path / "run", ms.rollout

    def failing(*args, **kwargs):
        if kwargs.get("greedy"):
            raise r.RetrievalError("retrieval server http://x/retrieve failed after 4 attempts")
        return real_rollout(*args, **kwargs)

    monkeypatch.setattr(ms, "rollout", failing)
    with pytest.raises(SystemExit, match=r"saved .*checkpoint-000000 after 0 steps. When the server is back"):
        train(quick_config(out, steps=2))
    monkeypatch.setattr(ms, "rollout", real_rollout)
    train(quick_config(out, steps=2, resume=True))
    assert logged_steps(out) == ([1, 2], [0, 2])
    assert_same_run(out, reference_runs(2))


def test_a_retrieval_failure_in_an_evaluation_keeps_the_step_taken(tmp_path, monkeypatch, learning, reference_runs):
    """The evaluation after step 2 fails: the checkpoint holds step 2 with the random state after it, so the
    resumed run evaluates at step 2 and goes on as the uninterrupted run."""
    out = tmp_path / "run"
    real_rollout, evaluations = ms.rollout, []

    def failing(*args, **kwargs):
        if kwargs.get("greedy"):
            evaluations.append(1)
            if len(evaluations) == 3:                      # at steps 0, 1, then 2
                raise r.RetrievalError("retrieval server http://x/retrieve failed after 4 attempts")
        return real_rollout(*args, **kwargs)

    monkeypatch.setattr(ms, "rollout", failing)
    with pytest.raises(SystemExit, match="after 2 steps"):
        train(quick_config(out, steps=3, eval_every=1))
    monkeypatch.setattr(ms, "rollout", real_rollout)
    train(quick_config(out, steps=3, eval_every=1, resume=True))
    assert_same_run(out, reference_runs(3, eval_every=1))
    assert logged_steps(out) == ([1, 2, 3], [0, 1, 2, 3])


# ------------------------------------------------------------------------------------- what resuming loads ---

class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_a_trainer_state_that_would_run_code_is_refused_unrun(tmp_path):
    out, marker = tmp_path / "run", tmp_path / "code-ran"
    train(quick_config(out, steps=1))
    state = out / "checkpoint-000001" / "trainer_state.pt"
    assert torch.load(state, weights_only=True)["step"] == 1                # what this program writes
    torch.save({"step": 1, "optimizer": RunsCode(marker), "rng": {}}, state)
    with pytest.raises(SystemExit, match=r"trainer_state.pt is damaged or was not written by memsearcher.py "
                                         r"\(UnpicklingError\); it was not loaded, since loading it could run code"):
        train(quick_config(out, steps=2, resume=True))
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- the warm start ---

@pytest.mark.parametrize("damage", ["model.safetensors", "tokenizer.json", "config.json"])
def test_a_damaged_warm_start_is_named_with_its_fix(tmp_path, damage):
    cfg = quick_config(tmp_path / "run")
    folder = Path(warm.tiny_policy(cfg))
    if damage == "tokenizer.json":
        (folder / damage).unlink()
    else:
        (folder / damage).write_bytes((folder / damage).read_bytes()[:30])
    with pytest.raises(SystemExit, match=f"^warm start: {folder} is damaged .*--rebuild-warm-start builds it again$"):
        warm.tiny_policy(cfg)
    assert warm.tiny_policy(ms.Config(**{**asdict(cfg), "rebuild_warm_start": True})) == str(folder)
    assert warm.tiny_policy(cfg) == str(folder)


def test_one_warm_start_build_at_a_time_and_leftovers_removed(tmp_path, monkeypatch):
    cfg = quick_config(tmp_path / "run")
    Path(cfg.warm_start_dir).mkdir(parents=True)
    built, real_build = [], warm.build_tiny_model

    def build(*args):
        built.append(1)
        time.sleep(0.5)                                    # long enough for the other run to arrive
        return real_build(*args)

    monkeypatch.setattr(warm, "build_tiny_model", build)
    results = []
    runs_at_once = [threading.Thread(target=lambda: results.append(warm.tiny_policy(cfg))) for _ in range(2)]
    for t in runs_at_once:
        t.start()
    for t in runs_at_once:
        t.join()
    assert len(built) == 1 and len(results) == 2 and results[0] == results[1]
    folder = Path(results[0])
    left = folder.parent / f".tmp-{folder.name}-999"         # a killed rebuild's leftover
    left.mkdir()
    warm.tiny_policy(cfg)
    assert not left.exists() and len(built) == 1


def test_a_failing_retrieval_server_keeps_the_run(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, pretrain_steps=0, warm_steps=0, steps=3, group_size=2, questions_per_step=2,
                      eval_n=2, max_new_tokens=8, eval_every=0, print_every=0)
    calls = []
    real_rollout = ms.rollout

    def rollout(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:                  # eval at step 0, step 1, then the server goes down in step 2
            raise r.RetrievalError("retrieval server http://x/retrieve failed after 4 attempts; last error: HTTP 503")
        return real_rollout(*args, **kwargs)

    monkeypatch.setattr(ms, "rollout", rollout)
    with pytest.raises(SystemExit, match="HTTP 503(.|\\n)*after 1 steps(.|\\n)*--resume"):
        train(cfg)
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-000001"
    assert runs.restore_trainer_state(torch.optim.AdamW(ms.load_policy(str(tmp_path / "checkpoint-000001"),
                                                                        torch.device("cpu"))[0].parameters()),
                                    tmp_path / "checkpoint-000001") == 1


# ----------------------------------------------------------------------- several processes (torchrun, gloo) ---

def synthetic_rollout(model, tokenizer, search, questions, cfg, **kwargs):
    """Trajectories drawn from each question's id and its copy's place in its group alone, whichever process rolls
    it out: 1-3 conversations of random ids, answered right or wrong."""
    trajs = []
    for i, q in enumerate(questions):
        rng = random.Random(f"{q['id']} {i % cfg.group_size}")
        t = ms.new_trajectory(q)
        for _ in range(rng.randint(1, 3)):
            prompt, sampled = rng.randint(5, 40), rng.randint(3, 30)
            t["convs"].append({"ids": [rng.randrange(len(tokenizer)) for _ in range(prompt + sampled)],
                               "mask": [0] * prompt + [1] * sampled})
        t["answer"] = q["golden_answers"][0] if rng.random() < 0.5 else "wrong"
        t["stop"] = "answered"
        trajs.append(t)
    return trajs


def one_grpo_step(rank, folder, questions, out, world=1, port=0):
    """One GRPO step (KL term, SGD) on the synthetic rollouts, as process `rank` of `world`: rank 0 saves the
    weights and stats to `out`."""
    if world > 1:                                   # a process of its own (torch.multiprocessing.spawn), as torchrun's
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        runs.start_processes()
        ms.rollout = synthetic_rollout
    model, tokenizer = ms.load_policy(folder, torch.device("cpu"))
    ref_model, _ = ms.load_policy(folder, torch.device("cpu"))
    cfg = ms.Config(**{**ms.PRESETS["tiny"], "group_size": 4, "kl_coef": 0.1, "updates_per_step": 1,
                       "micro_batch_tokens": 150})
    trajs, stats = ms.grpo_step(model, ref_model, torch.optim.SGD(model.parameters(), lr=0.1), tokenizer, None,
                                questions, cfg)
    if runs.rank() == 0:
        torch.save({"weights": [p.detach() for p in model.parameters()], "stats": stats,
                    "rewards": [t["reward"] for t in trajs]}, out)
    if world > 1:
        runs.barrier()                              # leave together: a process group torn down by one exit aborts
        torch.distributed.destroy_process_group()


def test_two_processes_take_the_step_of_one(tiny, tmp_path, monkeypatch):
    """Two gloo processes, each with its share of the questions (all G rollouts of each), take the same update as one
    process with all of them: the token mean is over both processes' rows, the gradients are summed, and both
    processes step. Their micro-batches differ, so the sums run in another order: equal to float precision."""
    cfg, model, tokenizer = tiny
    folder = tmp_path / "policy"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    questions = r.load_questions(cfg.test_file[0])[:5]          # 3 for the first process, 2 for the second
    monkeypatch.setattr(ms, "rollout", synthetic_rollout)
    one_grpo_step(0, str(folder), questions, tmp_path / "one.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(one_grpo_step, args=(str(folder), questions, tmp_path / "two.pt", 2, port), nprocs=2)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one["rewards"] == two["rewards"] and 0 < sum(one["rewards"]) < len(one["rewards"])
    assert one["stats"]["kl"] == two["stats"]["kl"] == 0.0 and one["stats"]["mixed_groups"] > 0
    for key in ["loss", "grad_norm", "entropy_proxy", "reward", "mixed_groups"]:
        assert two["stats"][key] == pytest.approx(one["stats"][key], rel=1e-5), key
    moved = [(a - p).abs().max().item() for a, p in zip(one["weights"], model.parameters())]
    assert max(moved) > 1e-3
    assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(one["weights"], two["weights"]))


def torchrun(*args):
    """memsearcher.py under torchrun, 2 processes on the CPU, started (not waited for)."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(ROOT / "memsearcher.py"), *args], cwd=ROOT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def worker_of_rank(out, rank):
    """The pid of the torchrun worker of this rank that runs into the folder `out`."""
    while True:
        for proc in Path("/proc").glob("[0-9]*"):
            with contextlib.suppress(OSError):
                if str(out) in (proc / "cmdline").read_text() and f"\0RANK={rank}\0" in (proc / "environ").read_text():
                    return int(proc.name)
        time.sleep(0.05)


@pytest.mark.slow
def test_a_torchrun_of_two_processes_is_one_run(tmp_path, learned):
    """torchrun --nproc_per_node 2 on the CPU (gloo): one metrics line per step, one checkpoint, and an evaluation
    split over the processes whose metrics are those of their trajectories gathered by hand. SIGTERM to one of the
    processes stops both after the same step, with its checkpoint; --resume under torchrun then ends the run as
    if it had never stopped."""
    cfg, _, _ = learned
    common = ["--tiny", "--model", str(runs.latest_checkpoint(cfg.output_dir)), "--train-file", cfg.train_file[0],
              "--test-file", cfg.test_file[0], "--corpus", cfg.corpus, "--steps", "3", "--group-size", "4",
              "--questions-per-step", "6", "--eval-n", "8", "--eval-every", "3", "--max-turns", "4",
              "--eval-max-turns", "4", "--print-every", "0"]
    whole = torchrun(*common, "--output-dir", str(tmp_path / "whole"))
    assert whole.wait(timeout=600) == 0, whole.stdout.read()[-3000:]
    assert logged_steps(tmp_path / "whole") == ([1, 2, 3], [0, 3])
    assert sorted(p.name for p in (tmp_path / "whole").glob("checkpoint-*")) == ["checkpoint-000003"]
    # the evaluation, by hand: each process's share rolled out alone, then put back in order
    model, tokenizer = ms.load_policy(str(tmp_path / "whole" / "checkpoint-000003"), torch.device("cpu"))
    run_cfg = parse_args(common + ["--output-dir", str(tmp_path / "whole")])
    _, test_qs, search = ms.load_data(run_cfg)
    shares = [ms.rollout(model, tokenizer, search, test_qs[i::2], run_cfg, greedy=True, max_turns=4) for i in (0, 1)]
    by_hand = [shares[i % 2][i // 2] for i in range(len(test_qs))]
    for t in by_hand:
        t["reward"] = ms.trajectory_reward(t, "em")
    assert runs.logged_evaluations(tmp_path / "whole")[3] == json.loads(json.dumps(ms.summarize(by_hand)))
    # a stop sent to the second process alone
    stopped = torchrun(*common, "--output-dir", str(tmp_path / "stopped"))
    second = worker_of_rank(tmp_path / "stopped", 1)
    while not any(rec.get("step") == 1 and "reward" in rec for rec in runs.read_metrics(tmp_path / "stopped")):
        time.sleep(0.05)
    os.kill(second, signal.SIGTERM)
    output = stopped.communicate(timeout=600)[0]
    assert "Stopped: saved" in output and "torchrun --nproc_per_node=2" in output and "--resume" in output
    done = int((tmp_path / "stopped" / "latest").read_text().split("-")[1])
    assert 1 <= done < 3 and logged_steps(tmp_path / "stopped")[0] == list(range(1, done + 1))
    resumed = torchrun(*common, "--output-dir", str(tmp_path / "stopped"), "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stdout.read()[-3000:]
    assert_same_run(tmp_path / "stopped", tmp_path / "whole")
    assert logged_steps(tmp_path / "stopped") == ([1, 2, 3], [0, 3])
    assert any(rec["mixed_groups"] > 0 for rec in runs.read_metrics(tmp_path / "whole") if "reward" in rec)
