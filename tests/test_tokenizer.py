"""Tokenizer backends and model-directory loading (chat formats: test_chat.py).

Both backends are trained in memory on a few KB of ASCII text, so any non-ASCII character below
is outside the learned vocabulary and must survive through byte fallback / byte-level BPE.
"""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from selfimprove_jax.tokenizer import (
    FAMILIES,
    STOP_STRINGS,
    HFTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    render_chat,
    stop_ids_for_family,
    train_hf_bpe,
    train_sentencepiece,
)

_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Self-improvement loops sample answers, verify them and train on the good ones.",
    "Question: what is 12 plus 30? Answer: 42.",
    "A tokenizer maps text to integer ids and back again without losing anything.",
    "user model assistant system: roles in a chat transcript.",
]
CORPUS = [f"{s} ({i})" for i in range(40) for s in _SENTENCES]  # ~10 KB

ROUND_TRIP_TEXTS = {
    "ascii": "Hello, world! 1 + 1 = 2.",
    "whitespace": "  leading, double  spaces,\ttab\nnewline\n\ntrailing  ",
    "accents": "naïve café, résumé, Ångström, façade",
    "cjk": "日本語のテキストと中文",
    "emoji": "ok 🙂👍🏽 🇫🇷",
    "mixed": "Q: ¿qué? A: 答え 🙂\n",
    "empty": "",
}

HF_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
               "<|end_header_id|>", "<|eot_id|>", "<|pad|>")


@pytest.fixture(scope="module")
def sp_tok():
  return train_sentencepiece(CORPUS, vocab_size=512)


@pytest.fixture(scope="module")
def hf_tok():
  return train_hf_bpe(CORPUS, vocab_size=512, special_tokens=HF_SPECIALS,
                      pad_token="<|pad|>")


@pytest.fixture(scope="module", params=["sentencepiece", "hf"])
def tok(request, sp_tok, hf_tok):
  return sp_tok if request.param == "sentencepiece" else hf_tok


# --- Encoding and decoding -----------------------------------------------------------------------

@pytest.mark.parametrize("name", list(ROUND_TRIP_TEXTS))
def test_round_trip(tok, name):
  text = ROUND_TRIP_TEXTS[name]
  for add_bos in (False, True):
    ids = tok.encode(text, add_bos=add_bos)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids, skip_special=True) == text
  assert tok.decode(tok.encode(text, add_bos=False)) == text


def test_sentencepiece_byte_fallback_for_unseen_characters(sp_tok):
  # Neither character occurs in the corpus: each must become its 3 UTF-8 byte pieces, not <unk>.
  ids = sp_tok.encode("世界", add_bos=False)
  assert len(ids) == len("世界".encode("utf-8")) == 6
  assert sp_tok.token_to_id("<unk>") not in ids
  assert ids[0] == sp_tok.token_to_id("<0xE4>")
  assert sp_tok.decode(ids) == "世界"


def test_batch_matches_single(tok):
  texts = list(ROUND_TRIP_TEXTS.values())
  for add_bos in (False, True):
    assert tok.encode_batch(texts, add_bos=add_bos) == [tok.encode(t, add_bos) for t in texts]
  batch = tok.encode_batch(texts)
  assert tok.decode_batch(batch, skip_special=True) == texts


def test_encode_batch_rejects_a_bare_string(tok):
  with pytest.raises(TypeError, match="single str"):
    tok.encode_batch("abc")


def test_decode_accepts_numpy_and_rejects_out_of_range(tok):
  ids = tok.encode("fox", add_bos=False)
  assert tok.decode(np.asarray(ids, np.int32)) == "fox"
  with pytest.raises(ValueError, match=str(tok.vocab_size)):
    tok.decode([*ids, tok.vocab_size])


def test_sentencepiece_special_ids(sp_tok):
  assert (sp_tok.pad_id, sp_tok.eos_id, sp_tok.bos_id) == (0, 1, 2)
  assert sp_tok.token_to_id("<unk>") == 3
  assert sp_tok.token_to_id("<start_of_turn>") == 4
  assert sp_tok.token_to_id("<end_of_turn>") == 5
  assert sp_tok.stop_ids == (1, 5)
  assert sp_tok.vocab_size <= 512


def test_hf_special_ids(hf_tok):
  # BpeTrainer gives special tokens the first ids, in order.
  assert (hf_tok.bos_id, hf_tok.eos_id, hf_tok.pad_id) == (0, 1, 5)
  assert hf_tok.stop_ids == (1, 4)  # EOS, then <|eot_id|>
  assert hf_tok.vocab_size <= 512


def test_pad_falls_back_to_eos(hf_tok):
  no_pad = HFTokenizer(hf_tok.hf_tokenizer, bos_token="<|begin_of_text|>",
                       eos_token="<|end_of_text|>")
  assert no_pad.pad_id == no_pad.eos_id == 1


@pytest.mark.parametrize("backend, pieces", [
    ("sentencepiece", ["<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>"]),
    ("hf", list(HF_SPECIALS)),
])
def test_special_tokens_are_single_ids(backend, pieces, sp_tok, hf_tok):
  tok = sp_tok if backend == "sentencepiece" else hf_tok
  for piece in pieces:
    i = tok.token_to_id(piece)
    assert tok.encode(piece, add_bos=False) == [i], piece
    assert tok.decode([i]) == piece
    ids = tok.encode(f"fox{piece}dog", add_bos=False)
    assert ids.count(i) == 1
    assert tok.decode(ids) == f"fox{piece}dog"
    assert tok.decode(ids, skip_special=True) == "foxdog"


def test_add_bos_is_exact(tok):
  text = "The lazy dog."
  plain = tok.encode(text, add_bos=False)
  assert tok.bos_id not in plain
  assert tok.encode(text, add_bos=True) == [tok.bos_id, *plain]
  assert tok.encode(text) == [tok.bos_id, *plain]  # add_bos defaults to True
  # Text that already starts with the BOS string (rendered chats do) still gets exactly one.
  bos_piece = tok.decode([tok.bos_id])
  with_bos = tok.encode(bos_piece + text, add_bos=True)
  assert with_bos == [tok.bos_id, *plain]
  assert tok.encode(bos_piece + text, add_bos=False) == [tok.bos_id, *plain]


def test_hf_post_processor_is_bypassed(hf_tok):
  # The wrapped tokenizer prepends BOS on its own (like Llama 3's tokenizer.json) ...
  raw = hf_tok.hf_tokenizer.encode("The lazy dog.").ids
  assert raw[0] == hf_tok.bos_id
  # ... which must neither leak into add_bos=False nor double up with add_bos=True.
  assert hf_tok.encode("The lazy dog.", add_bos=False) == raw[1:]
  assert hf_tok.encode("The lazy dog.", add_bos=True) == raw


def test_model_without_bos(hf_tok):
  qwen_like = HFTokenizer(hf_tok.hf_tokenizer, eos_token="<|end_of_text|>", bos_token=None)
  assert qwen_like.bos_id is None
  assert qwen_like.encode("dog", add_bos=True) == qwen_like.encode("dog", add_bos=False)


def test_token_to_id_missing_piece(tok, hf_tok):
  with pytest.raises(KeyError, match="<no_such_piece>"):
    tok.token_to_id("<no_such_piece>")
  with pytest.raises(KeyError, match="<eos>"):
    HFTokenizer(hf_tok.hf_tokenizer, eos_token="<eos>")


def test_chat_prompt_round_trips_through_tokens(sp_tok, hf_tok):
  messages = [{"role": "user", "content": "What is 12 plus 30?"}]
  for tok, family, markers in [(sp_tok, "gemma3", ["<start_of_turn>", "<end_of_turn>"]),
                               (hf_tok, "llama3", ["<|start_header_id|>", "<|eot_id|>"])]:
    text = render_chat(family, messages)
    ids = tok.encode(text, add_bos=True)
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
    for marker in markers:
      assert tok.token_to_id(marker) in ids
    assert tok.decode(ids) == text


def test_stop_ids_for_family(sp_tok, hf_tok):
  assert stop_ids_for_family(sp_tok, "gemma2") == (1, sp_tok.token_to_id("<end_of_turn>"))
  assert stop_ids_for_family(hf_tok, "llama3") == (1, hf_tok.token_to_id("<|eot_id|>"))
  # Stop strings absent from the vocabulary are skipped, not errors.
  assert stop_ids_for_family(hf_tok, "qwen2") == hf_tok.stop_ids
  with pytest.raises(ValueError, match="llama4"):
    stop_ids_for_family(hf_tok, "llama4")
  assert set(STOP_STRINGS) == set(FAMILIES)


# --- Loading from a model directory --------------------------------------------------------------

def test_load_tokenizer_sentencepiece(tmp_path, sp_tok):
  sp_tok.save(tmp_path)
  loaded = load_tokenizer(tmp_path)
  assert isinstance(loaded, SentencePieceTokenizer)
  text = ROUND_TRIP_TEXTS["mixed"]
  assert loaded.encode(text) == sp_tok.encode(text)
  assert loaded.stop_ids == sp_tok.stop_ids
  # The bytes constructor and the path constructor agree.
  assert SentencePieceTokenizer(sp_tok.model_proto).encode(text) == sp_tok.encode(text)


def test_load_tokenizer_hf(tmp_path, hf_tok):
  hf_tok.save(tmp_path)
  loaded = load_tokenizer(tmp_path)
  assert isinstance(loaded, HFTokenizer)
  assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (0, 1, 5)
  text = ROUND_TRIP_TEXTS["mixed"]
  assert loaded.encode(text, add_bos=False) == hf_tok.encode(text, add_bos=False)


def test_load_tokenizer_prefers_tokenizer_json(tmp_path, sp_tok, hf_tok):
  sp_tok.save(tmp_path)
  hf_tok.save(tmp_path)
  assert isinstance(load_tokenizer(tmp_path), HFTokenizer)


def test_load_tokenizer_empty_dir(tmp_path):
  with pytest.raises(FileNotFoundError) as info:
    load_tokenizer(tmp_path)
  message = str(info.value)
  assert str(tmp_path) in message
  assert "tokenizer.json" in message and "tokenizer.model" in message


def test_from_model_dir_reads_both_config_files(tmp_path, hf_tok):
  hf_tok.hf_tokenizer.save(str(tmp_path / "tokenizer.json"))
  # tokenizer_config.json wins; null means "no such token"; dicts carry "content";
  # special_tokens_map.json fills only keys the config lacks.
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({
      "bos_token": None,
      "eos_token": {"content": "<|eot_id|>", "lstrip": False},
  }))
  (tmp_path / "special_tokens_map.json").write_text(json.dumps({
      "bos_token": "<|begin_of_text|>",
      "eos_token": "<|end_of_text|>",
      "pad_token": {"content": "<|pad|>"},
  }))
  tok = HFTokenizer.from_model_dir(tmp_path)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, 4, 5)


def test_from_model_dir_without_eos(tmp_path, hf_tok):
  hf_tok.hf_tokenizer.save(str(tmp_path / "tokenizer.json"))
  with pytest.raises(ValueError, match="eos_token"):
    HFTokenizer.from_model_dir(tmp_path)


def test_training_rejects_empty_corpus():
  with pytest.raises(ValueError, match="empty"):
    train_sentencepiece([], vocab_size=300)
  with pytest.raises(ValueError, match="empty"):
    train_hf_bpe([], vocab_size=300)


def test_package_does_not_import_jax():
  code = "import sys, selfimprove_jax.tokenizer; print('jax' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=pathlib.Path(__file__).resolve().parents[1])
  assert out.stdout.strip() == "False"
