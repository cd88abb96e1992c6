"""Tokenizers the tests build with the `tokenizers` library (the reference), saved as Hugging Face directories:
byte-level BPE in the GPT-2, Llama-3, Qwen2 and SmolLM styles, and SentencePiece-style BPE with byte_fallback in the
styles real models ship (Llama-2's Prepend normalizer; Metaspace with each prepend scheme; no dummy prefix); chat
templates' Jinja text (ours, and the real ones transformers ships in its own source); text that exercises tokenizers;
and where the real files of ../shared/real are."""

import base64
import json
import os
import random

import pytest

TRAIN_CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2024, and we've got 1234567 reasons!",
    "Café naïve résumé über straße déjà vu — «quotes» and ‘single’ “double”.",
    "日本語のテキストです。中文文本也在这里。한국어 문장도 있습니다.",
    "Emoji: 😀🎉👍🏽 👨‍👩‍👧 🇫🇷 ❤️ ✓",
    "def f(x):\n    return x**2 + 3*x - 1  # comment\n\n\tif a != b: print(\"hi\")\n",
    "   leading spaces, trailing spaces   \n\n\n   multiple\r\n newlines \t tabs\t\t",
    "I'm, you're, he'll, they'd, she's, it's, we've, I'D, YOU'LL",
    "numbers 3.14159 2,718 10e-5 007 123456789 ١٢٣ ½",
    "<html><body class=\"x\">text &amp; more</body></html> {\"json\": [1, 2, 3]}",
] * 3
HELD_OUT = [
    "Held-out: Zürich's 42 cafés   served 3,000 crêpes!!\n\n  ok",
    "混合 text with 日本 and 😀 emoji ... and spaces      end  ",
    "x = [i for i in range(10)] ; y={'a':1}\n\t\treturn None\r\n",
    "They'll've DONE it's 99 problems 123456 7 89",
    "   \n \n  ", "a", "", "1 2 3  4   5", "ﬁ ligature Å (A+ring) Å e\u0301 ñ",
    "tabs\t\tand\u00a0nbsp\u2003em-space, zero\u200bwidth",
    " leading space", "  two leading", "trailing space ", "▁literal ▁ marks▁", "Ω ф ж 𝔘 \x00 \x7f \U0010ffff",
    "</s> special-token text <s> stays <unk> text <|im_end|>", "\n\nstarts with newlines", "a\u0301\u0302 combining",
]
HF_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SP_SPECIALS = ["<unk>", "<s>", "</s>"]
# The templates as their models publish them (written here from the public formats).
CHATML_JINJA = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
                "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                "{% endif %}")
LLAMA3_JINJA = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
                "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
ZEPHYR_JINJA = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + "
                "message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + "
                "message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n' + "
                "message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n"
                "{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")

# Templates built like SmolLM2's (the system turn inline, with real newlines in the JSON) and Qwen2.5's (a tools
# branch, and '\n' escapes inside the Jinja strings); their system prompts are our own.
SMOL_STYLE_JINJA = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                    "{{ '<|im_start|>system\nYou are Tiny, a helpful model.<|im_end|>\n' }}{% endif %}"
                    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
                    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
QWEN_STYLE_JINJA = ("{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}"
                    "{{- messages[0]['content'] }}{%- else %}{{- \"You are Small, made by a \\\"test\\\".\" }}"
                    "{%- endif %}{{- '<|im_end|>\\n' }}{%- else %}{%- if messages[0]['role'] == 'system' %}"
                    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}"
                    "{{- \"<|im_start|>system\\nYou are Small, made by a \\\"test\\\".<|im_end|>\\n\" }}{%- endif %}"
                    "{%- endif %}{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
                    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
                    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
                    "{%- endif %}")


def real_dir(name: str) -> str:
    """A folder of ../shared/real (from the repo, or from a worktree one level deeper, or $NANOSPIN_REAL_FILES);
    the test is skipped where it is absent."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    roots = [os.environ.get("NANOSPIN_REAL_FILES", ""), os.path.join(repo, "..", "shared", "real"),
             os.path.join(repo, "..", "..", "shared", "real")]
    for root in roots:
        if root and os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    pytest.skip(f"real files '{name}' not present (../shared/real)")


def fuzz_texts(n: int, seed: int) -> list[str]:
    """Random strings mixing the pieces where pre-tokenizers, normalizers and byte fallback disagree most easily."""
    rng = random.Random(seed)
    alphabet = list("ab cd  \n\t\r0123 45'sltvemdr.,!?-_ÅéÜ日本😀\u0301▁")
    alphabet += ["'s", "'ll", "   ", "\n\n", " 1", "12", "ww", "----", "...", "中文", "語", "Ω", "ф", "🦙", "\u200b",
                 "</s>", "<s>", "Café", " the", "ing", "▁▁", "\x00", "ż"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(n)]


def varied_texts(seed: int = 1) -> list[str]:
    """HELD_OUT, the training lines, and 300 fuzz strings: 340 strings."""
    return HELD_OUT + TRAIN_CORPUS[:9] + fuzz_texts(300, seed)


def train_hf_tokenizer(directory, style: str, specials=HF_SPECIALS, chat_template=None, eos="<|im_end|>"):
    """A small byte-level BPE trained by `tokenizers`, saved as a Hugging Face directory."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer(models.BPE())
    if style == "gpt2":  # GPT-2: the ByteLevel pre-tokenizer's own regex
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif style in ("llama3", "qwen2"):  # a Split regex, ByteLevel without regex, NFC
        pattern = LLAMA3_PATTERN if style == "llama3" else QWEN2_PATTERN
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        hf.normalizer = normalizers.NFC()
    elif style == "digits":  # SmolLM: single digits, then GPT-2's regex
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(TRAIN_CORPUS, trainer)
    os.makedirs(directory, exist_ok=True)
    hf.save(os.path.join(directory, "tokenizer.json"))
    if chat_template is not None:
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump({"chat_template": chat_template, "eos_token": eos}, f)
    return hf


# Llama-2's decoder: '▁' back to spaces, <0xXX> tokens back to bytes, and the dummy prefix's space removed
LLAMA2_DECODER = {"type": "Sequence", "decoders": [
    {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"},
    {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
# How real SentencePiece-style tokenizer.json files state the dummy prefix: (normalizer, pre_tokenizer).
SP_STYLES = {
    "prepend": ([{"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}],
                None),  # Llama-2, Mistral v0.1, TinyLlama, zephyr
    "first": (None, {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}),
    "always-split": (None, {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}),
    "old-metaspace": (None, {"type": "Metaspace", "replacement": "▁", "add_prefix_space": True}),
    "gemma": ([{"type": "Replace", "pattern": {"String": " "}, "content": "▁"}],  # no dummy prefix, and a Split
              {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False}),
    "metaspace-never": (None, {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "never", "split": False}),
}


def _sp_merges(vocab: dict[str, int], kind: str, trained: list) -> list:
    """'trained': the trainer's merges; 'spm': every split of a piece into two pieces, ordered by the piece's
    score, as transformers converts a SentencePiece model (its own generate_merges)."""
    if kind != "spm":
        return trained
    from transformers.tokenization_utils_base import generate_merges

    normal = {p: i for p, i in vocab.items() if p not in SP_SPECIALS}
    return [list(m) for m in generate_merges(normal, {p: -float(i) for p, i in normal.items()})]


def sentencepiece_hf_tokenizer(directory, style: str = "prepend", merges: str = "trained", added=(),
                               chat_template=None, config: dict | None = None):
    """A SentencePiece-style BPE (byte_fallback, '▁' for spaces) trained by `tokenizers` and saved as a Hugging Face
    directory. merges: 'trained' | 'spm' (see _sp_merges) | 'crossing' (trained without splitting at '▁', so merges
    cross word boundaries). added: extra added-token dicts (content, special, lstrip, rstrip, single_word,
    normalized). A limited alphabet leaves rare characters to byte fallback."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, normalizers, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    if merges != "crossing":
        hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    else:
        hf.normalizer = normalizers.Replace(" ", "▁")
    trainer = trainers.BpeTrainer(vocab_size=450, special_tokens=SP_SPECIALS, show_progress=False, limit_alphabet=75)
    hf.train_from_iterator(TRAIN_CORPUS + [" ".join(TRAIN_CORPUS[:9]).replace("  ", " ")], trainer)
    spec = json.loads(hf.to_str())
    vocab = spec["model"]["vocab"]
    spec["model"]["merges"] = _sp_merges(vocab, merges, spec["model"]["merges"])
    n = len(vocab)
    vocab.update({f"<0x{b:02X}>": n + b for b in range(256)})
    spec["model"]["byte_fallback"] = True
    normalizer, pre_tokenizer = SP_STYLES[style]
    spec["normalizer"] = {"type": "Sequence", "normalizers": normalizer} if normalizer else None
    spec["pre_tokenizer"] = pre_tokenizer
    spec["decoder"] = LLAMA2_DECODER
    for i, token in enumerate(added):
        content = token["content"]
        token_id = vocab[content] if content in vocab else len(vocab) + i
        spec["added_tokens"].append({"id": token_id, "single_word": False, "lstrip": False, "rstrip": False,
                                     "normalized": not token.get("special", False), "special": False, **token})
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "tokenizer.json"), "w") as f:
        json.dump(spec, f, ensure_ascii=False)
    config = {"eos_token": "</s>", **(config or {}), **({"chat_template": chat_template} if chat_template else {})}
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return HFTokenizer.from_str(json.dumps(spec))


def real_templates() -> dict[str, str]:
    """Real chat templates, as transformers ships them in its own source (Llama-4's, with strftime_now; Qwen2-Audio's,
    Qwen2-Instruct's ChatML with a default system prompt; SmolVLM's): the test is skipped where they cannot be read."""
    try:
        from transformers.models.llama4 import processing_llama4
        from transformers.models.qwen2_audio.processing_qwen2_audio import Qwen2AudioProcessor
        from transformers.models.smolvlm import processing_smolvlm
    except ImportError as e:
        pytest.skip(f"transformers' real templates not available ({e})")
    return {"llama4": processing_llama4.chat_template,
            "qwen2-audio": Qwen2AudioProcessor.default_chat_template.fget(None),
            "smolvlm": processing_smolvlm.DEFAULT_CHAT_TEMPLATE}


def tiktoken_encoding_of(directory, name: str = "gpt2"):
    """A byte-level BPE directory's tokenizer as a tiktoken Encoding (rank = id, GPT-2's split regex): what tiktoken's
    own 'gpt2' is for GPT-2's files, for tests without network."""
    import tiktoken

    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    vocab = json.load(open(os.path.join(directory, "tokenizer.json"), encoding="utf-8"))["model"]["vocab"]
    ranks = {bytes(byte_of[c] for c in token): i for token, i in vocab.items()
             if token != "<|endoftext|>" and all(c in byte_of for c in token)}
    return tiktoken.Encoding(name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": vocab["<|endoftext|>"]})


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte, as byte-level BPE vocab files write bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}


def write_tiktoken_file(path, tokens: list[bytes]) -> None:
    """A tiktoken BPE file: one 'base64(token) rank' line per token."""
    with open(path, "wb") as f:
        f.write(b"".join(base64.b64encode(t) + b" %d\n" % i for i, t in enumerate(tokens)))
