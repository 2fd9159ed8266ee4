"""Probe data: each file format, field choice, bad input, the built-in sample, and packing into full blocks.

No worker process runs here; these are the parent's reading and tokenizing steps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from peftpick.errors import PeftpickError
from peftpick.probes.data import ByteTokens, Example, ModelTokens, load_probe_data, pack_blocks
from peftpick.probes.sample import arithmetic_problems, sample_texts

ROWS = [
    {"text": "The cat sat on the mat.", "label": 1},
    {"text": "A dog barked twice.", "label": 0},
    {"text": "Rain fell all night.", "label": 1},
]
TEXTS = [row["text"] for row in ROWS]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    import csv

    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# ------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv", ".parquet"])
def test_each_record_format_reads_the_text_field(tmp_path: Path, suffix: str):
    path = tmp_path / f"data{suffix}"
    if suffix in (".jsonl", ".json"):
        write_jsonl(path, ROWS)
    elif suffix == ".csv":
        write_csv(path, ROWS)
    elif suffix == ".tsv":
        write_csv(path, ROWS, delimiter="\t")
    else:
        write_parquet(path, ROWS)
    data = load_probe_data(path)
    assert [example.text for example in data.examples] == TEXTS
    assert all(example.prompt is None for example in data.examples)
    assert "3 records" in data.description and "'text'" in data.description


def test_json_array_is_read_like_json_lines(tmp_path: Path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(ROWS), encoding="utf-8")
    assert [example.text for example in load_probe_data(path).examples] == TEXTS


def test_plain_text_paragraphs_are_examples(tmp_path: Path):
    path = tmp_path / "book.txt"
    path.write_text("First line\nstill first.\n\n\nSecond paragraph.\n\nThird.", encoding="utf-8")
    data = load_probe_data(path)
    assert [example.text for example in data.examples] == ["First line\nstill first.", "Second paragraph.", "Third."]
    assert "3 paragraphs" in data.description


def test_prompt_response_pair_is_recognised_by_its_names(tmp_path: Path):
    rows = [{"query": "What is 2 + 3?", "response": "2 + 3 = 5. The answer is: 5", "type": "GSM"}]
    data = load_probe_data(write_jsonl(tmp_path / "math.jsonl", rows))
    assert data.examples == (Example(text="2 + 3 = 5. The answer is: 5", prompt="What is 2 + 3?"),)
    assert "'query'/'response'" in data.description


def test_field_names_can_be_overridden(tmp_path: Path):
    rows = [{"body": "Some body text.", "ask": "Why?", "reply": "Because."}]
    path = write_csv(tmp_path / "data.csv", rows)
    assert load_probe_data(path, text_field="body").examples == (Example("Some body text."),)
    assert load_probe_data(path, prompt_field="ask", response_field="reply").examples == \
        (Example("Because.", prompt="Why?"),)


def test_records_without_a_value_are_skipped_and_counted(tmp_path: Path):
    rows = [{"text": "kept"}, {"text": ""}, {"text": None}, {"text": "also kept"}]
    data = load_probe_data(write_jsonl(tmp_path / "data.jsonl", rows))
    assert [example.text for example in data.examples] == ["kept", "also kept"]
    assert data.skipped == 2 and "2 without a value skipped" in data.description


def test_reading_stops_after_enough_characters(tmp_path: Path):
    rows = [{"text": "x" * 100} for _ in range(1000)]
    data = load_probe_data(write_jsonl(tmp_path / "big.jsonl", rows), max_chars=1_000)
    assert len(data.examples) == 10


def test_identity_follows_the_bytes_and_the_fields(tmp_path: Path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "a", "other": "b"}])
    first = load_probe_data(path).identity
    assert load_probe_data(path).identity == first
    assert load_probe_data(path, text_field="other").identity != first
    write_jsonl(path, [{"text": "a changed", "other": "b"}])
    assert load_probe_data(path).identity != first


# ------------------------------------------------------------------------------------------- bad input


def problem_of(path: Path, **fields) -> str:
    with pytest.raises(PeftpickError) as caught:
        load_probe_data(path, **fields)
    assert caught.value.fix, "every data error says how to fix it"
    return caught.value.problem


def test_missing_text_field_names_the_fields_there_are(tmp_path: Path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"content": "hello", "id": 1}])
    problem = problem_of(path)
    assert "no 'text' field" in problem and "content, id" in problem
    assert "no field 'body'" in problem_of(path, text_field="body")


def test_missing_response_field_is_reported(tmp_path: Path):
    path = write_parquet(tmp_path / "data.parquet", [{"prompt": "p", "answer": "a"}])
    assert "no field 'response'" in problem_of(path, prompt_field="prompt", response_field="response")


def test_a_later_record_without_the_field_is_reported_with_its_line(tmp_path: Path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": "fine"}, {"body": "no text here"}])
    assert "line 2" in problem_of(path)


def test_only_one_of_prompt_and_response_is_refused(tmp_path: Path):
    path = write_jsonl(tmp_path / "data.jsonl", ROWS)
    assert "only one of the prompt and response" in problem_of(path, prompt_field="text")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet", ".txt"])
def test_empty_file_is_refused(tmp_path: Path, suffix: str):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    assert "is empty" in problem_of(path)


def test_file_of_blank_lines_or_header_only_holds_no_records(tmp_path: Path):
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n  \n")
    assert "holds no records" in problem_of(blank)
    header = tmp_path / "header.csv"
    header.write_text("text,label\n")
    assert "holds no records" in problem_of(header)


def test_malformed_json_line_is_reported_with_its_number(tmp_path: Path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "broken\n')
    problem = problem_of(path)
    assert "line 2" in problem and "not valid JSON" in problem


def test_unknown_extension_lists_the_formats(tmp_path: Path):
    path = tmp_path / "data.xlsx"
    path.write_bytes(b"PK\x03\x04")
    with pytest.raises(PeftpickError) as caught:
        load_probe_data(path)
    assert "unknown data format '.xlsx'" in caught.value.problem
    assert ".jsonl" in caught.value.fix and ".parquet" in caught.value.fix


def test_missing_file_and_folder_are_refused(tmp_path: Path):
    assert "no such data file" in problem_of(tmp_path / "absent.jsonl")
    folder = tmp_path / "folder.jsonl"
    folder.mkdir()
    assert "is a folder" in problem_of(folder)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_file_without_read_permission_is_refused(tmp_path: Path):
    path = write_jsonl(tmp_path / "secret.jsonl", ROWS)
    path.chmod(0)
    try:
        assert "cannot read" in problem_of(path)
    finally:
        path.chmod(0o600)


def test_bytes_that_are_not_utf8_are_refused(tmp_path: Path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("text\ncaf\xe9 au lait\n".encode("latin-1"))
    assert "not UTF-8" in problem_of(path)


def test_corrupt_parquet_is_refused(tmp_path: Path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"this is not parquet at all" * 10)
    assert "not a readable Parquet file" in problem_of(path)


def test_fields_for_plain_text_or_without_a_file_are_refused(tmp_path: Path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    assert "plain text" in problem_of(path, text_field="text")
    assert "without a data file" in problem_of(None, text_field="text")


def test_non_text_field_values_are_refused(tmp_path: Path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"text": [{"role": "user", "content": "hi"}]}])
    assert "holds a list" in problem_of(path)


# ------------------------------------------------------------------------------------------- built-in sample


def test_builtin_sample_is_deterministic_and_in_question_answer_form():
    first = sample_texts(5_000)
    assert first == sample_texts(5_000)
    assert sum(map(len, first)) >= 5_000
    for text in first:
        question, answer = text.split("\nAnswer: ")
        assert question.startswith("Question: ")
        assert answer.split("The answer is: ")[-1].lstrip("-").isdigit()
    assert len(set(first)) > 0.9 * len(first), "problems are drawn, not repeated"


def test_builtin_sample_arithmetic_is_right():
    """The answers are what the questions ask: a model can learn the sample only if it is consistent."""
    import re

    problems = arithmetic_problems()
    for _ in range(400):
        _question, answer = next(problems)
        for left, op, right, result in re.findall(r"(-?\d+) ([-+*/]) (-?\d+) = (-?\d+)", answer):
            a, b, c = int(left), int(right), int(result)
            assert {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b and a % b == 0 else None}[op] == c, answer


def test_builtin_sample_is_the_default_data():
    data = load_probe_data(None, max_chars=2_000)
    assert data.examples and data.identity.startswith("builtin-arithmetic-v")
    assert all(example.text.startswith("Question: ") for example in data.examples)


# ------------------------------------------------------------------------------------------- packing


def test_blocks_are_full_length_and_follow_the_stream():
    data = load_probe_data(None, max_chars=3_000)
    encoder = ByteTokens(vocab_size=128, eos_id=127)
    blocks, notes = pack_blocks(data, encoder, seq_len=32, blocks=5)
    assert tuple(blocks.shape) == (5, 32)
    stream = [token for example in data.examples for token in encoder.encode(example)]
    assert blocks.flatten().tolist() == stream[:160]
    assert notes == ()


def test_short_data_is_repeated_to_fill_the_blocks_and_says_so():
    data = load_probe_data(None, max_chars=1)  # one problem, about 150 bytes
    encoder = ByteTokens(vocab_size=256, eos_id=0)
    one_pass = encoder.encode(data.examples[0])
    blocks, notes = pack_blocks(data, encoder, seq_len=64, blocks=10)
    flat = blocks.flatten().tolist()
    assert flat[: len(one_pass)] == one_pass and flat[len(one_pass): 2 * len(one_pass)] == one_pass
    assert len(notes) == 1 and "repeated" in notes[0]


def test_byte_tokens_fold_into_a_small_vocabulary():
    tokens = ByteTokens(vocab_size=100, eos_id=99).encode(Example("é"))  # two UTF-8 bytes above 100
    assert tokens == [0xC3 % 100, 0xA9 % 100, 99]


def _word_tokenizer(chat_template: str | None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<eos>", "USER:", "BOT:", "what", "is", "two", "four", "the", "answer"]
    core = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", unk_token="<unk>")
    tokenizer.chat_template = chat_template
    return tokenizer


def test_model_tokenizer_uses_the_chat_template_for_pairs_only():
    template = ("{% for m in messages %}{{ 'USER:' if m['role'] == 'user' else 'BOT:' }} {{ m['content'] }} "
                "{% endfor %}")
    tokens = ModelTokens(_word_tokenizer(template), "test", vocab_size=10)
    assert "chat template" in tokens.name
    # USER: what is two BOT: four <eos>
    assert tokens.encode(Example("four", prompt="what is two")) == [2, 4, 5, 6, 3, 7, 1]
    assert tokens.encode(Example("the answer")) == [8, 9, 1]
    plain = ModelTokens(_word_tokenizer(None), "test", vocab_size=10)
    assert plain.encode(Example("four", prompt="what is two")) == [4, 5, 6, 7, 1]


def test_token_ids_beyond_the_model_vocabulary_are_folded_and_noted():
    tokens = ModelTokens(_word_tokenizer(None), "test", vocab_size=8)  # the tokenizer knows 10 words
    data = load_probe_data(None, max_chars=1)
    blocks, notes = pack_blocks(type(data)((Example("the answer"),), "d", "i"), tokens, seq_len=3, blocks=1)
    assert blocks.tolist() == [[0, 1, 1]]  # 8 % 8, 9 % 8, eos
    assert any("beyond the model's vocabulary" in note for note in notes)
