"""Text sources and packing into contexts."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from dictlens import iter_documents
from dictlens.data.packing import pack_contexts, resolve_prepend_bos, special_token_ids
from dictlens.data.text import default_documents
from dictlens.errors import InputError


def test_txt_file_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.md").write_text("second document")
    (sub / "ignored.bin").write_bytes(b"\x00\x01")
    assert list(iter_documents(str(tmp_path / "a.txt"))) == ["first document"]
    assert list(iter_documents(str(tmp_path))) == ["first document", "second document"]


def test_jsonl_field_and_errors(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"body": "hello"}) + "\n\n" + json.dumps({"body": "world"}) + "\n")
    assert list(iter_documents(str(path), field="body")) == ["hello", "world"]
    with pytest.raises(InputError, match=r"docs.jsonl:1: no field 'text' \(found \['body'\]\)"):
        list(iter_documents(str(path)))
    path.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(InputError, match=r"docs.jsonl:2: not valid JSON"):
        list(iter_documents(str(path)))


def test_parquet_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"content": ["one", None, "two"]}), path)
    assert list(iter_documents(str(path), field="content")) == ["one", "two"]
    with pytest.raises(InputError, match="no column 'text'"):
        list(iter_documents(str(path)))


def test_saved_hf_dataset(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["alpha", "beta"]}).save_to_disk(str(tmp_path / "ds"))
    assert list(iter_documents(str(tmp_path / "ds"))) == ["alpha", "beta"]


def test_stdin(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("from standard input"))
    assert list(iter_documents("-")) == ["from standard input"]


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        list(iter_documents(str(tmp_path / "nope.txt")))
    (tmp_path / "empty.txt").write_text("  \n\n ")
    with pytest.raises(InputError, match="empty.txt is empty"):
        list(iter_documents(str(tmp_path / "empty.txt")))
    (tmp_path / "folder").mkdir()
    with pytest.raises(InputError, match="holds no .txt"):
        list(iter_documents(str(tmp_path / "folder")))


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(InputError, match="no-such-user/no-such-dataset"):
        list(iter_documents("no-such-user/no-such-dataset"))


def test_default_corpus_is_real_text():
    docs = default_documents()
    assert len(docs) > 70
    assert any("for" in d and "statement" in d for d in docs)  # pydoc's language reference
    assert docs == default_documents()  # fixed order


def test_packing_keeps_every_token_in_order(tiny_tokenizer):
    docs = ["the quick brown fox", "jumps over the lazy dog " * 20, "end"]
    contexts = list(pack_contexts(docs, tiny_tokenizer, 16, prepend_bos=True))
    bos, eos, pad = tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    assert all(len(c.ids) == 16 and c.ids[0] == bos for c in contexts)
    assert all(c.n_valid == 16 for c in contexts[:-1])
    last = contexts[-1]
    assert np.all(last.ids[last.n_valid:] == pad)
    stream = np.concatenate([c.ids[1:c.n_valid] for c in contexts]).tolist()
    expected = []
    for d in docs:
        expected += tiny_tokenizer(d, add_special_tokens=False)["input_ids"] + [eos]
    assert stream == expected


def test_packing_without_bos(tiny_tokenizer):
    contexts = list(pack_contexts(["word " * 100], tiny_tokenizer, 8, prepend_bos=False))
    assert contexts[0].ids[0] != tiny_tokenizer.bos_token_id
    assert resolve_prepend_bos(tiny_tokenizer, "auto") is True
    assert special_token_ids(tiny_tokenizer) == {0, 1, 2}
