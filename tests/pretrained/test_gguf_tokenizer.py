import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from quickmerge.pretrained.gguf_tokenizer import BYTE, CONTROL, NORMAL, bpe_merges, tokenizer_from_gguf  # noqa: E402

PIECES = ["<pad>", "<eos>", "<bos>", "<unk>", "<0x21>", "▁", "a", "b", "c", "ab", "▁ab", "abc", "bc", "▁c"]
SCORES = [0.0, 0.0, 0.0, 0.0, 0.0, -100.0, -101.0, -102.0, -103.0, -1.0, -2.0, -3.0, -50.0, -4.0]
TYPES = [CONTROL, CONTROL, CONTROL, 2, BYTE] + [NORMAL] * 9


def test_merges_follow_piece_scores():
    merges = bpe_merges(PIECES, SCORES, TYPES)
    assert merges[0] == ("a", "b")  # "ab" has the highest score
    assert ("▁", "ab") in merges and ("ab", "c") in merges and ("a", "bc") in merges
    assert merges.index(("ab", "c")) < merges.index(("b", "c"))  # "abc" (-3) before "bc" (-50)


def test_tokenizer_rebuilt_from_a_gguf_file(tmp_path):
    path = str(tmp_path / "tiny.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(PIECES)
    writer.add_token_scores(SCORES)
    writer.add_token_types(TYPES)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tok = tokenizer_from_gguf(path)
    ids = tok("abc ab c!")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<bos>", "abc", "▁ab", "▁c", "<0x21>"]
    assert tok.decode(ids, skip_special_tokens=True) == "abc ab c!"
