"""A toy text stack made of the real Hugging Face classes.

The toy teachers read prompts through the same code path as SDXL and SD3: a real
`PreTrainedTokenizerFast` (a `tokenizers` WordLevel model over the toy grammar's words) and tiny,
randomly initialised `CLIPTextModel`, `CLIPTextModelWithProjection` and `T5EncoderModel`. They save
and load with `save_pretrained` / `AutoTokenizer.from_pretrained` like the real ones, so a toy
teacher ships as an ordinary diffusers folder.
"""
from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                          PreTrainedTokenizerFast, T5Config, T5EncoderModel)

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)  # ids 0..3, in this order

# Words of the toy world's GenEval-style grammar (objects, colours, counts, positions), plus
# punctuation. Unknown words map to <unk>, so a grammar change degrades, it does not crash.
TOY_WORDS = (
    "a an the of and with photo image picture there is are on in to above below left right "
    "side top bottom next two three four five six one "
    "red green blue yellow orange purple pink brown black white gray grey cyan magenta "
    "circle circles square squares triangle triangles star stars ring rings cross crosses "
    "diamond diamonds hexagon hexagons shape shapes object objects background plain , ."
).split()


def _check_words(words: Iterable[str], pre_tokenizer) -> list[str]:
    """Lower-case, de-duplicate (keeping order), and refuse words the pre-tokenizer would split."""
    if isinstance(words, str):
        raise TypeError("build_word_tokenizer: `words` must be a list of words, not one string; "
                        "use text.split() to make the list")
    seen: dict[str, None] = {}
    for word in words:
        word = str(word).lower()
        if word in SPECIAL_TOKENS:
            raise ValueError(f"build_word_tokenizer: {word!r} is a reserved special token")
        pieces = [p for p, _ in pre_tokenizer.pre_tokenize_str(word)]
        if pieces != [word]:
            raise ValueError(
                f"build_word_tokenizer: the word {word!r} would be split into {pieces} by the "
                "whitespace/punctuation pre-tokenizer, so it could never be looked up; "
                "pass its pieces as separate words")
        seen.setdefault(word, None)
    if not seen:
        raise ValueError("build_word_tokenizer: the word list is empty")
    return list(seen)


def build_word_tokenizer(words: Iterable[str] = TOY_WORDS, max_length: int = 16,
                         add_bos: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: lower-cased, split on whitespace and punctuation, ids 0..3 for
    <pad> <unk> <bos> <eos>, each sequence wrapped as [<bos>] words <eos> (T5 style: add_bos=False),
    truncated and padded to `max_length` (its model_max_length, which the pipelines pad to).
    """
    min_length = 2 + int(add_bos)
    if int(max_length) < min_length:
        raise ValueError(f"build_word_tokenizer: max_length={max_length} leaves no room for a word "
                         f"next to the special tokens; use max_length >= {min_length}")
    pre_tokenizer = pre_tokenizers.Whitespace()
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *_check_words(words, pre_tokenizer)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizer
    template = f"{BOS} $A {EOS}" if add_bos else f"$A {EOS}"
    backend.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=int(max_length), padding_side="right")


def _token_ids(tokenizer) -> dict:
    return dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def clip_text_config(tokenizer, hidden_size: int = 16, num_layers: int = 2, num_heads: int = 2,
                     projection_dim: int | None = None) -> CLIPTextConfig:
    """A tiny CLIP text config sized for `tokenizer` (vocab, special ids, sequence length).

    At least two layers, because SDXL and SD3 read the penultimate hidden state.
    """
    if num_layers < 2:
        raise ValueError(f"clip_text_config: num_layers={num_layers}; SDXL/SD3 read the "
                         "penultimate hidden state, so use num_layers >= 2")
    if hidden_size % num_heads:
        raise ValueError(f"clip_text_config: hidden_size={hidden_size} is not divisible by "
                         f"num_heads={num_heads}")
    return CLIPTextConfig(
        hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim or hidden_size, hidden_act="gelu", **_token_ids(tokenizer))


def tiny_clip_text_model(tokenizer, hidden_size: int = 16, projection: bool = False,
                         projection_dim: int | None = None, **config_kw):
    """A random CLIPTextModel (SDXL's CLIP-L), or CLIPTextModelWithProjection (CLIP-G, and both
    CLIP encoders of SD3)."""
    config = clip_text_config(tokenizer, hidden_size, projection_dim=projection_dim, **config_kw)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def t5_encoder_config(tokenizer, d_model: int = 32, num_layers: int = 2,
                      num_heads: int = 2) -> T5Config:
    """A tiny T5 v1.1-style encoder config (gated GELU, as SD3's T5-XXL) sized for `tokenizer`."""
    if d_model % num_heads:
        raise ValueError(f"t5_encoder_config: d_model={d_model} is not divisible by "
                         f"num_heads={num_heads}")
    ids = _token_ids(tokenizer)
    return T5Config(
        vocab_size=ids["vocab_size"], d_model=d_model, d_kv=d_model // num_heads,
        d_ff=2 * d_model, num_layers=num_layers, num_heads=num_heads,
        relative_attention_num_buckets=8, relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False,
        pad_token_id=ids["pad_token_id"], eos_token_id=ids["eos_token_id"],
        decoder_start_token_id=ids["pad_token_id"])


def tiny_t5_encoder(tokenizer, d_model: int = 32, **config_kw) -> T5EncoderModel:
    return T5EncoderModel(t5_encoder_config(tokenizer, d_model, **config_kw)).eval()
