"""GGUF files that cannot become a checkpoint are refused with the file and the reason named;
the real conversions are in test_real_weights.py."""
import numpy as np
import pytest

gguf_lib = pytest.importorskip("gguf")

from selfimprove_jax.checkpoint import convert, gguf  # pylint: disable=g-import-not-at-top


def _write_gguf(path, architecture):
  writer = gguf_lib.GGUFWriter(str(path), architecture)
  writer.add_block_count(1)
  writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def test_describe_reads_the_header(tmp_path):
  _write_gguf(tmp_path / "m.gguf", "llama")
  architecture, types = gguf.describe(tmp_path / "m.gguf")
  assert architecture == "llama" and types == {"F32": 1}


def test_unsupported_architecture_names_the_file_and_the_architecture(tmp_path):
  _write_gguf(tmp_path / "rwkv.gguf", "rwkv6")
  with pytest.raises(ValueError, match=r"rwkv.gguf: GGUF architecture 'rwkv6' is not supported; "
                                       r"supported: llama, gemma2"):
    gguf.convert_gguf(tmp_path / "rwkv.gguf", tmp_path / "out")
  assert not (tmp_path / "out").exists()


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
  (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
  with pytest.raises(ValueError, match=r"model.safetensors is not a readable GGUF file"):
    gguf.convert_gguf(tmp_path / "model.safetensors", tmp_path / "out")
  with pytest.raises(FileNotFoundError, match="missing.gguf does not exist"):
    gguf.describe(tmp_path / "missing.gguf")


def test_cli_reports_the_refusal(tmp_path, capsys):
  _write_gguf(tmp_path / "rwkv.gguf", "rwkv6")
  assert convert.main(["--from", "gguf", "--to", "hf", str(tmp_path / "rwkv.gguf"),
                       str(tmp_path / "out")]) == 2
  assert "'rwkv6' is not supported" in capsys.readouterr().err
