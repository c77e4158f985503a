"""The toy text stack: a real HF fast tokenizer and tiny real CLIP / T5 encoders."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, CLIPTextModel, PreTrainedTokenizerFast

from fewstep.backbones import text

torch.set_num_threads(1)
WORDS = ["a", "red", "blue", "circle", "square", "two", ".", ","]


def ids_of(tokenizer, prompts, length=None):
    length = length or tokenizer.model_max_length
    return tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                     return_tensors="pt").input_ids


def test_word_tokenizer_lowercases_splits_punctuation_and_pads():
    tok = text.build_word_tokenizer(WORDS, max_length=8)
    assert isinstance(tok, PreTrainedTokenizerFast)
    vocab = tok.get_vocab()
    pad, unk, bos, eos = (vocab[t] for t in text.SPECIAL_TOKENS)
    assert (pad, unk, bos, eos) == (0, 1, 2, 3)
    got = ids_of(tok, ["A RED circle.", "green"]).tolist()
    assert got[0] == [bos, vocab["a"], vocab["red"], vocab["circle"], vocab["."], eos, pad, pad]
    assert got[1] == [bos, unk, eos, pad, pad, pad, pad, pad]


def test_truncation_keeps_the_end_token_and_t5_style_has_no_bos():
    tok = text.build_word_tokenizer(WORDS, max_length=5)
    assert ids_of(tok, ["a a a a a a a"]).tolist()[0][-1] == tok.eos_token_id
    t5_style = text.build_word_tokenizer(WORDS, max_length=5, add_bos=False)
    assert ids_of(t5_style, ["red"]).tolist()[0][:2] == [t5_style.get_vocab()["red"],
                                                         t5_style.eos_token_id]


def test_word_tokenizer_round_trips_through_auto_tokenizer(tmp_path):
    tok = text.build_word_tokenizer(WORDS, max_length=8)
    tok.save_pretrained(tmp_path / "tokenizer")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert loaded.model_max_length == 8
    prompts = ["two blue squares, a red circle", "", "unknown words here"]
    assert torch.equal(ids_of(loaded, prompts), ids_of(tok, prompts))
    assert loaded.pad_token == text.PAD and loaded.eos_token == text.EOS


@pytest.mark.parametrize("words, error, match", [
    ("a red circle", TypeError, "list of words"),
    (["left-of"], ValueError, "'left-of' would be split"),
    (["<pad>"], ValueError, "reserved"),
    ([], ValueError, "empty"),
])
def test_bad_word_lists_are_refused_clearly(words, error, match):
    with pytest.raises(error, match=match):
        text.build_word_tokenizer(words, max_length=8)


def test_max_length_too_small_is_refused():
    with pytest.raises(ValueError, match="max_length >= 3"):
        text.build_word_tokenizer(WORDS, max_length=2)


def test_tiny_clip_models_fit_the_tokenizer():
    tok = text.build_word_tokenizer(WORDS, max_length=8)
    ids = ids_of(tok, ["a red circle", "two blue squares ."])
    clip_l = text.tiny_clip_text_model(tok, hidden_size=16)
    out = clip_l(ids, output_hidden_states=True)
    assert len(out.hidden_states) == 3 and out.hidden_states[-2].shape == (2, 8, 16)
    eos_at = (ids == tok.eos_token_id).int().argmax(-1)  # pooled output is read at <eos>
    assert torch.equal(out.pooler_output, out.last_hidden_state[torch.arange(2), eos_at])
    clip_g = text.tiny_clip_text_model(tok, hidden_size=32, projection=True, projection_dim=24)
    assert clip_g(ids).text_embeds.shape == (2, 24)


def test_tiny_t5_encoder_runs_and_clip_round_trips(tmp_path):
    tok = text.build_word_tokenizer(WORDS, max_length=8, add_bos=False)
    t5 = text.tiny_t5_encoder(tok, d_model=32)
    assert t5(ids_of(tok, ["a red circle"])).last_hidden_state.shape == (1, 8, 32)
    clip = text.tiny_clip_text_model(tok, hidden_size=16)
    clip.save_pretrained(tmp_path / "clip")
    loaded = CLIPTextModel.from_pretrained(tmp_path / "clip")
    ids = ids_of(tok, ["two red squares"])
    with torch.no_grad():
        assert torch.equal(loaded(ids).last_hidden_state, clip(ids).last_hidden_state)


def test_config_errors_name_the_culprit():
    tok = text.build_word_tokenizer(WORDS, max_length=8)
    with pytest.raises(ValueError, match="num_layers >= 2"):
        text.clip_text_config(tok, num_layers=1)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        text.clip_text_config(tok, hidden_size=15, num_heads=2)
    with pytest.raises(ValueError, match="d_model=30"):
        text.t5_encoder_config(tok, d_model=30, num_heads=4)
