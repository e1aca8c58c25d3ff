"""Tests for data/warm_start.py: the tiny model's warm start and another model's cold start (the scripted
experts, imitation, building once and reusing), offline on the CPU.

    HF_HUB_OFFLINE=1 python -m pytest -q test_warm_start.py
"""
import codecs
import json
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import data.warm_start as warm
import memsearcher as ms
import retriever as r
import runs
from conftest import ROOT, parity_reward, parse_args, quick_config, tiny_config, tiny_llama, train, weights
from retriever import local_searcher


def test_react_expert_makes_the_same_mistakes_in_one_masked_conversation(tiny, searcher):
    """The ReAct expert: one conversation = prompt 0 | search 1 | passages 0 | ... | answer 1, no memory. At the
    same rate and with the same random draws, it restates a fact at the start of its next thought exactly when
    the MemSearcher expert writes it into its memory, and fails exactly the same questions; at its own default
    rate it fails about as often."""
    cfg, _, tokenizer = tiny
    questions = r.load_questions(cfg.train_file[0])[:200]

    def play(workflow, **rates):                    # as imitate() plays them
        return warm.expert_trajectories(questions, searcher, tokenizer,
                                        tiny_config(cfg.output_dir, workflow=workflow, **rates))

    def written(t):                                 # what the expert wrote: every trained token
        return tokenizer.decode([i for c in t["convs"] for i, m in zip(c["ids"], c["mask"]) if m])

    def failed(trajs):
        return sum(t["reward"] == 0 for t in trajs) / len(trajs)

    memsearcher, react = play("memsearcher"), play("react", expert_lose_track=ms.Config().expert_forget)
    assert [t["reward"] for t in react] == [t["reward"] for t in memsearcher] and 0.2 < failed(react) < 0.8
    kept = {"memsearcher": [], "react": []}         # after each passage read: was its fact taken in?
    for mem, rea in zip(memsearcher, react):
        facts = [h["fact"] for h in mem["question"]["support"]]
        held = [sum(f in m for f in facts) for m in re.findall(r"<memory>(.*?)</memory>", written(mem))]
        thoughts = re.findall(r"<think>(.*?)</think>", written(rea))[1:]        # every thought after a passage
        kept["react"] += [any(th.strip().startswith(f) for f in facts) for th in thoughts]
        # MemSearcher also reads its last turn's passages into a memory; ReAct would in a next action: none comes
        assert len(held) - len(thoughts) == (mem["stop"] == "max_turns")
        kept["memsearcher"] += [now > before for before, now in zip([0] + held, held)][:len(thoughts)]
    assert kept["react"] == kept["memsearcher"] and 0.3 < sum(kept["react"]) / len(kept["react"]) < 0.9
    react = play("react")                           # --expert-lose-track 0.65 against --expert-forget 0.6
    assert 0 < failed(react) - failed(memsearcher) < 0.06
    same = sum(a["reward"] == b["reward"] for a, b in zip(react, memsearcher)) / len(questions)
    assert same > 0.9                               # coupled per question: a few more mistakes, on the same draws
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids              # noqa: E731
    for t in react:
        conv, = t["convs"]
        ids, mask = conv["ids"], conv["mask"]
        prompt = ms.render_prompt(tokenizer, t["question"]["question"], None, "react")
        assert ids[:len(prompt)] == prompt and not any(mask[:len(prompt)])
        i, actions = len(prompt), []
        while i < len(ids):                         # alternate: a trained action, then untrained passages
            j = i
            while j < len(ids) and mask[j] == mask[i]:
                j += 1
            text = tokenizer.decode(ids[i:j])
            if mask[i]:
                actions.append(ms.parse_action(text))
                assert ids[i:j] == encode(text) and "<memory>" not in text and text.endswith("<|im_end|>")
            else:                                   # a user turn with the passages, then the next turn opens
                assert text.startswith("\n<|im_start|>user\n<information>")
                assert text.endswith("</information>\n<|im_end|>\n<|im_start|>assistant\n")
            i = j
        assert all(kind == "search" for kind, _ in actions[:-1]) and actions[-1][0] in ("search", "answer")
        assert (t["stop"] == "answered") == (actions[-1][0] == "answer")


@pytest.mark.slow
def test_warm_start_is_built_once_per_setting_and_reused(tmp_path, capsys, monkeypatch):
    """A later run with the same settings loads the kept warm start, and its GRPO run is the same run."""
    few = tmp_path / "train.jsonl"                        # 100 questions: the expert plays every one
    few.write_text("".join(open(ROOT / "data" / "train.jsonl").readlines()[:100]))
    cfg = tiny_config(tmp_path / "a", train_file=[str(few)], pretrain_steps=3, warm_steps=4, steps=2, group_size=4,
                      questions_per_step=2, eval_n=3, max_new_tokens=16, eval_every=0, print_every=0)
    cfg.warm_start_dir = str(tmp_path / "warm")
    built = warm.tiny_policy(cfg)
    assert "warm start: building" in capsys.readouterr().out
    assert warm.tiny_policy(cfg) == built and "warm start: reusing" in capsys.readouterr().out
    record = json.loads((Path(built) / "warm_start.json").read_text())
    assert record["settings"]["warm_steps"] == 4 and len(record["imitation"]["loss_every_10_steps"]) == 1
    other = warm.tiny_policy(ms.Config(**{**asdict(cfg), "warm_steps": 5}))      # another setting, another model
    assert other != built
    rebuilt = warm.tiny_policy(ms.Config(**{**asdict(cfg), "rebuild_warm_start": True}))
    assert rebuilt == built and "warm start: building" in capsys.readouterr().out
    # GRPO after building (run a) and after reusing (run b): the same run, with updates that move the weights
    # (parity_reward gives the barely imitated model mixed groups)
    monkeypatch.setattr(ms, "trajectory_reward", parity_reward)
    first = train(cfg)
    second = train(ms.Config(**{**asdict(cfg), "output_dir": str(tmp_path / "b")}))
    assert first == second
    logs = [[{k: v for k, v in rec.items() if not k.endswith("_s")} for rec in runs.read_metrics(tmp_path / run)]
            for run in "ab"]
    assert logs[0] == logs[1] and any(rec.get("mixed_groups", 0) > 0 and rec["grad_norm"] > 0 for rec in logs[0])
    assert torch.equal(weights(tmp_path / "a" / "checkpoint-000002"), weights(tmp_path / "b" / "checkpoint-000002"))
    assert not torch.equal(weights(built), weights(tmp_path / "a" / "checkpoint-000002"))


@pytest.fixture(scope="session")
def qwen_model(tmp_path_factory, qwen_dir):
    """A model folder that is not the tiny one: Qwen2.5's real tokenizer and chat template (built offline) and a
    random Qwen2 of one layer of hidden size 64 over its 151,936-row vocabulary."""
    path = Path(shutil.copytree(qwen_dir, tmp_path_factory.mktemp("qwen2-h64"), dirs_exist_ok=True))
    torch.manual_seed(0)
    warm.small_qwen2(151_936, 64, 1, bos_token_id=None, eos_token_id=151645,
                     pad_token_id=151643).save_pretrained(path)
    return path


def cold_start_args(tmp_path, model, train_file):
    """--small with another model, cold-started for a few imitation steps, then one GRPO step."""
    return ["--small", "--model", str(model), "--warm-steps", "4", "--warm-batch", "2", "--cold-lr", "1e-2",
            "--train-file", str(train_file), "--top-k", "1", "--max-turns", "2", "--eval-max-turns", "2",
            "--max-new-tokens", "8", "--steps", "1", "--group-size", "4", "--questions-per-step", "2", "--eval-n", "2",
            "--eval-every", "0", "--print-every", "0", "--output-dir", str(tmp_path / "run"),
            "--warm-start-dir", str(tmp_path / "warm")]


def expert_nll(path, convs, cfg):
    """Mean negative log-likelihood of the expert's tokens (the loss mask) under the model in `path`."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids, attention, mask, _ = ms.collate(convs, model.config.pad_token_id, model.device)
    with torch.no_grad():
        logp = ms.token_logprobs(model, ids, attention, mask, cfg.logprob_chunk)
    return (-(logp * mask).sum() / mask.sum()).item()


@pytest.mark.slow
def test_another_model_is_cold_started_once_then_grpo_starts_from_it(tmp_path, qwen_model, capsys, monkeypatch):
    """A model that is not the tiny one imitates the expert (its conversations in Qwen's chat template): the kept
    folder imitates better than the model did, a later run reuses it, and its GRPO starts from it and keeps it as
    the KL reference."""
    few = tmp_path / "train.jsonl"                        # the expert plays every training question
    few.write_text("".join(open(ROOT / "data" / "train.jsonl").readlines()[:10]))
    args = cold_start_args(tmp_path, qwen_model, few)
    cfg = parse_args(args)
    folder = warm.warm_started(cfg)
    assert Path(folder).name.startswith(f"{qwen_model.name}-memsearcher-seed0-")
    assert "imitates the scripted expert for 4 steps" in capsys.readouterr().out
    record = json.loads((Path(folder) / "warm_start.json").read_text())
    assert "pretrain" not in record and record["settings"]["cold_lr"] == 1e-2
    tokenizer = AutoTokenizer.from_pretrained(qwen_model)
    expert = warm.expert_trajectories(ms.load_questions(few)[:2], local_searcher(cfg.corpus, show_progress=False),
                                      tokenizer, cfg)
    convs = [c for t in expert for c in t["convs"]]
    assert tokenizer.decode(convs[0]["ids"]).startswith(f"<|im_start|>system\n{ms.SYSTEM_PROMPT}<|im_end|>")
    assert expert_nll(folder, convs, cfg) < expert_nll(qwen_model, convs, cfg) - 0.1
    # the command line: the kept cold start is reused, GRPO starts from it and keeps it as the KL reference
    loaded, real_load = [], ms.load_policy
    monkeypatch.setattr(ms, "load_policy", lambda path, device: loaded.append(path) or real_load(path, device))
    monkeypatch.setattr(ms, "trajectory_reward", parity_reward)    # mixed groups: the step moves the weights
    ms.main(args)
    assert "warm start: reusing" in capsys.readouterr().out
    assert loaded == [folder] * 3                         # the damage check, the policy, the reference
    step, = [rec for rec in runs.read_metrics(tmp_path / "run") if "reward" in rec]
    assert step["mixed_groups"] > 0 and step["grad_norm"] > 0 and cfg.kl_coef > 0
    start, end = (load_file(Path(f) / "model.safetensors") for f in [folder, tmp_path / "run" / "checkpoint-000001"])
    assert start.keys() == end.keys() and not all(torch.equal(start[k], end[k]) for k in start)


def test_cold_start_on_data_without_hop_chains_is_refused_before_any_work(tmp_path, monkeypatch):
    """--small imitates the toy world's expert by default: other data is refused at once, saying what to pass,
    before the run folder is taken or the index built (a real corpus can take minutes to index)."""
    path = tmp_path / "nq.jsonl"
    path.write_text('{"id": "nq-1", "question": "who wrote hamlet?", "golden_answers": ["Shakespeare"]}\n')

    def work(*args, **kwargs):
        raise AssertionError("work started before the data was checked")

    monkeypatch.setattr(ms, "local_searcher", work)
    monkeypatch.setattr(runs, "open_run", work)
    with pytest.raises(SystemExit) as stop:
        ms.main(["--small", "--train-file", str(path), "--output-dir", str(tmp_path / "run"),
                 "--warm-start-dir", str(tmp_path / "warm")])
    assert "1 lack it, e.g. nq-1. On other data, pass --warm-steps 0" in str(stop.value.code)
    assert not (tmp_path / "warm").exists()


def test_warm_start_on_data_without_hop_chains_is_refused_before_any_work(tmp_path):
    path = tmp_path / "nq.jsonl"
    path.write_text('{"question": "who wrote hamlet?", "golden_answers": ["Shakespeare"]}\n')
    cfg = tiny_config(tmp_path / "run", train_file=[str(path)])
    start = time.time()
    with pytest.raises(SystemExit, match="--warm-steps needs questions with a 'support' hop chain"):
        warm.tiny_policy(cfg)
    assert time.time() - start < 5 and not (tmp_path / "run" / "warm-start").exists()


@pytest.mark.parametrize("bad_line, problem", [
    (b'{"id": "x", "text": "no contents"}', 'missing or empty "contents"'),
    ('{"id": "x", "contents": "Caf\xe9\\ntext"}'.encode("latin-1"), "not UTF-8"),
    (b"{not json", "invalid JSON"),
])
def test_a_bad_corpus_on_the_tiny_path_is_one_line_before_any_work(tmp_path, bad_line, problem):
    """--tiny builds its tokenizer from the corpus: read by the same reader as everywhere, before the warm start's
    minutes of pretraining and imitation (the --tiny defaults here)."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b'{"id": "a", "contents": "T\\ntext"}\n' + bad_line + b"\n")
    start = time.time()
    with pytest.raises(SystemExit) as stop:
        ms.main(["--tiny", "--corpus", str(corpus), "--output-dir", str(tmp_path / "run"),
                 "--warm-start-dir", str(tmp_path / "warm")])
    first_line = str(stop.value.code).splitlines()[0]
    assert first_line.startswith(f"memsearcher.py: {corpus}:2: {problem}") and "Error" not in first_line
    assert time.time() - start < 10 and not (tmp_path / "warm").exists()


def test_byte_order_marks_are_fine_on_the_tiny_path(tmp_path):
    corpus, train = tmp_path / "corpus.jsonl", tmp_path / "train.jsonl"
    corpus.write_bytes(codecs.BOM_UTF8 + b'{"id": "a", "contents": "Paris\\nParis is in France."}\n')
    train.write_bytes(codecs.BOM_UTF8 + b'{"question": "Where is Paris?", "golden_answers": ["France"]}\n')
    cfg = tiny_config(tmp_path / "run", corpus=str(corpus), train_file=[str(train)], pretrain_steps=0, warm_steps=0)
    assert (Path(warm.tiny_policy(cfg)) / "warm_start.json").exists()


# ----------------------------------------------------------------------------------------------- GGUF files ---
# --model FILE.gguf (--smol's SmolLM2-135M-Instruct.Q4_1.gguf): dequantized once into a plain fp32 model.

def write_gguf(path, model, tokenizer):
    """`model` (a Llama) and `tokenizer` (byte-level BPE, ChatML) as llama.cpp writes a GGUF file, quantized as
    SmolLM2-135M-Instruct.Q4_1.gguf is: the embedding in Q8_0, the other matrices in Q4_1, norms in f32, and the q
    and k rows permuted for llama.cpp's rotary layout. -> {parameter name: the weight after quantization and back,
    the fp32 values a loader must give}."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    cfg, heads, kv_heads = model.config, model.config.num_attention_heads, model.config.num_key_value_heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")                   # the tiny tokenizer's split (Qwen's), by llama.cpp's name
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([3 if token in tokenizer.all_special_tokens else 1 for token, _ in vocab])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(tokenizer.chat_template)

    def permute(w, n):                                  # llama.cpp's convert_hf_to_gguf.py: rows of q and k
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    expected = {}
    for name, param in model.state_dict().items():
        if name == "lm_head.weight":                    # tied: the file has the embedding alone
            continue
        layer = re.match(r"model\.layers\.(\d+)\.(.*)\.weight", name)
        key = f"blk.{layer[1]}.{names[layer[2]]}" if layer else names[name.removesuffix(".weight")]
        w = param.numpy()
        if key.endswith("attn_q") or key.endswith("attn_k"):
            w = permute(w, heads if key.endswith("attn_q") else kv_heads)
        kind = Q.F32 if w.ndim == 1 else Q.Q8_0 if key == "token_embd" else Q.Q4_1
        stored = w if kind == Q.F32 else gguf.quants.quantize(w, kind)
        writer.add_tensor(f"{key}.weight", stored, raw_dtype=kind)
        # Quantization works row by row, in blocks along a row: the rows' permutation does not change it.
        expected[name] = param if kind == Q.F32 else torch.from_numpy(
            gguf.quants.dequantize(gguf.quants.quantize(param.numpy(), kind), kind))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.fixture(scope="session")
def tiny_gguf(tiny, tmp_path_factory):
    """A tiny Llama as a quantized GGUF file, with the tiny tokenizer -> (its path, {parameter: expected fp32})."""
    _, _, tokenizer = tiny
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.Q4_1.gguf"
    model = tiny_llama(len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return path, write_gguf(path, model, tokenizer)


def test_a_gguf_file_becomes_a_plain_fp32_model_once(tiny, tiny_gguf, tmp_path, capsys):
    """The dequantized weights are the file's quantized values exactly, q and k back in Hugging Face's layout (the
    logits are those of the same weights in fp32), the tokenizer and chat template are the file's, and nothing of
    the GGUF is left: the folder loads as any model folder does."""
    _, _, tokenizer = tiny
    gguf_path, expected = tiny_gguf
    cfg = tiny_config(tmp_path, model=str(gguf_path), pretrain_steps=0, warm_steps=0)
    folder = warm.warm_started(cfg)
    assert "dequantizing it into a plain fp32 model" in capsys.readouterr().out
    assert warm.warm_started(cfg) == folder and capsys.readouterr().out == ""        # made once, then reused
    config = json.loads((Path(folder) / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    loaded = plain.state_dict()
    assert all(torch.equal(loaded[name], value) for name, value in expected.items())
    reference = tiny_llama(len(tokenizer))                             # the weights before quantization
    assert not torch.equal(reference.state_dict()["model.layers.0.self_attn.q_proj.weight"],
                           expected["model.layers.0.self_attn.q_proj.weight"])          # quantization did round
    reference.load_state_dict(expected, strict=False)                  # lm_head is tied to the embedding
    ids = torch.tensor([tokenizer("<search> Ilvo Marsk </search>").input_ids])
    assert torch.allclose(plain(ids).logits, reference(ids).logits, atol=1e-5)
    copied = AutoTokenizer.from_pretrained(folder)
    text = ms.SYSTEM_PROMPT + " Droashei Goadroathson, born 1834 in Mesholt.\n<memory> x </memory>"
    assert copied(text).input_ids == tokenizer(text).input_ids
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert copied.apply_chat_template(messages, tokenize=False) == tokenizer.apply_chat_template(messages,
                                                                                                 tokenize=False)


def test_a_run_from_a_gguf_file_saves_resumes_and_loads_with_no_gguf_left(tiny_gguf, tmp_path):
    """--smol's path, on the tiny GGUF file: a GRPO step saved, --resume for a second one, and checkpoints that are
    plain model folders (no GGUF quantization named in them: a saved GGUF-quantized model cannot be saved again)."""
    gguf_path, _ = tiny_gguf
    cfg = quick_config(tmp_path / "run", model=str(gguf_path), steps=1)
    train(cfg)
    train(ms.Config(**{**asdict(cfg), "steps": 2, "resume": True}))
    checkpoint = runs.latest_checkpoint(tmp_path / "run")
    assert checkpoint.name == "checkpoint-000002"
    assert [rec["step"] for rec in runs.read_metrics(tmp_path / "run") if "reward" in rec] == [1, 2]
    assert "quantization_config" not in json.loads((checkpoint / "config.json").read_text())
    assert not list(checkpoint.rglob("*.gguf"))
    model, _ = ms.load_policy(str(checkpoint), torch.device("cpu"))
    assert model.config.model_type == "llama" and next(model.parameters()).dtype == torch.float32
