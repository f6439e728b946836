"""The tiny model's tokenizer: byte-level BPE trained with the `tokenizers` library on the
synthetic tasks, saved as a Hugging Face `tokenizer.json` + `tokenizer_config.json` with a chat
template, as instruct models ship them.

The template wraps each turn in role tokens and ends an assistant turn with the end token:

    <|bos|><|user|>Count from 3 to 6.<|assistant|>3, 4, 5, 6.<|eos|>

Special tokens split the text, so a prompt rendered with `add_generation_prompt` followed by the
answer's own tokens is exactly the tokenisation of the whole conversation: training can mask the
prompt by position.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

PAD, BOS, EOS, USER, ASSISTANT = "<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, USER, ASSISTANT)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ message['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 3072, split_digits: bool = False) -> Tokenizer:
    """Byte-level BPE over `texts` with the special tokens first (ids 0 to 4). With `split_digits`
    every digit is its own token (as Llama 2 and Mistral tokenize numbers), so "40" is "4" "0"
    wherever it appears instead of one of two unrelated whole-number tokens ("40", " 40")."""
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # adds nothing: the template places BOS
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: Path, model_max_length: int) -> None:
    """`tokenizer.json` and a `tokenizer_config.json` with the special tokens and the chat template."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
              "unk_token": None, "model_max_length": model_max_length, "clean_up_tokenization_spaces": False,
              "chat_template": CHAT_TEMPLATE}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}, indent=2) + "\n")
