"""Random-initialised Llama checkpoints, made from a seed on first use and cached.

Tests and benchmark presets need models of a given shape without downloading anything: these are
written in the real Hugging Face layout (config, generation config, safetensors, tokenizer.json
with a chat template). Same seed, same bytes. Their text is word salad: the weights are random.
(The built-in default model, which really answers, is the trained one in `lengthwise/tiny/`.)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

FORMAT_VERSION = 1
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Whole-word tokens make the random model's output look like text rather than byte noise.
WORDS = """the of and to a in is it you that he was for on are with as I his they be at one have this
from or had by hot word but what some we can out other were all there when up use your how said an
each she which do their time if will way about many then them write would like so these her long make
thing see him two has look more day could go come did number sound no most people my over know water
than call first who may down side been now find any new work part take get place made live where after
back little only round man year came show every good me give our under name very through just form
sentence great think say help low line differ turn cause much mean before move right boy old too same
tell does set three want air well also play small end put home read hand port large spell add even land
here must big high such follow act why ask men change went light kind off need house picture try us
again animal point mother world near build self earth father head stand own page should country found
answer school grow study still learn plant cover food sun four between state keep eye never last let
thought city tree cross farm hard start might story saw far sea draw left late run while press close
night real life few north open seem together next white children begin got walk example ease paper
group always music those both mark often letter until mile river car feet care second book carry took
science eat room friend began idea fish mountain stop once base hear horse cut sure watch color face
wood main enough plain girl usual young ready above ever red list though feel talk bird soon body dog
family direct pose leave song measure door product black short numeral class wind question happen
complete ship area half rock order fire south problem piece told knew pass since top whole king space
heard best hour better true during hundred five remember step early hold west ground interest reach
fast verb sing listen six table travel less morning ten simple several vowel toward war lay against
pattern slow center love person money serve appear road map rain rule govern pull cold notice voice""".split()


def default_cache_dir() -> Path:
    """Where generated models are cached: `$LENGTHWISE_CACHE`, else `~/.cache/lengthwise`."""
    return Path(os.environ.get("LENGTHWISE_CACHE") or Path.home() / ".cache" / "lengthwise")


def random_model_dir(seed: int = 0, cache_dir: str | Path | None = None) -> Path:
    """Path of the random-initialised model for `seed`, building it first if it is not cached yet."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return build_once(cache / f"random-llama-v{FORMAT_VERSION}-seed{seed}", lambda out: write_random_llama(out, seed))


def build_once(target: Path, write: Callable[[Path], None]) -> Path:
    """Return checkpoint directory `target`, first writing it with `write(dir)` if it is not there.
    The files are written to a temporary directory renamed into place, so concurrent builders never
    see a half-written checkpoint."""
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first; its copy is identical
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_tokenizer() -> Tokenizer:
    """A byte-level BPE tokenizer: special tokens, 256 bytes, then whole words built by merges."""
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    # bytes_to_unicode order: the printable Latin-1 ranges first, as GPT-2 lays them out.
    byte_chars = sorted(byte_chars, key=lambda ch: (ord(ch) > 255, ord(ch)))
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in byte_chars:
        vocab.setdefault(ch, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        piece = "Ġ"
        for ch in word:
            merged = piece + ch
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append((piece, ch))
            piece = merged
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def write_random_llama(out_dir: str | Path, seed: int = 0) -> None:
    """Write a random-initialised Llama checkpoint (about 6M parameters) to `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    tok.save(str(out / "tokenizer.json"))
    vocab = tok.get_vocab_size(with_added_tokens=True)
    hidden, inter, layers, heads, kv_heads = 256, 688, 4, 8, 4
    head_dim = hidden // heads
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "rope_scaling": None, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "model_max_length": 1024, "chat_template": CHAT_TEMPLATE,
    }, indent=2) + "\n")
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * std

    tensors = {"model.embed_tokens.weight": normal(vocab, hidden, std=1.0),
               "model.norm.weight": torch.ones(hidden), "lm_head.weight": normal(vocab, hidden, std=0.05)}
    for i in range(layers):
        p = f"model.layers.{i}."
        std = 0.02
        tensors.update({
            p + "input_layernorm.weight": torch.ones(hidden),
            p + "post_attention_layernorm.weight": torch.ones(hidden),
            p + "self_attn.q_proj.weight": normal(heads * head_dim, hidden, std=std),
            p + "self_attn.k_proj.weight": normal(kv_heads * head_dim, hidden, std=std),
            p + "self_attn.v_proj.weight": normal(kv_heads * head_dim, hidden, std=std),
            p + "self_attn.o_proj.weight": normal(hidden, heads * head_dim, std=std),
            p + "mlp.gate_proj.weight": normal(inter, hidden, std=std),
            p + "mlp.up_proj.weight": normal(inter, hidden, std=std),
            p + "mlp.down_proj.weight": normal(hidden, inter, std=std),
        })
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
