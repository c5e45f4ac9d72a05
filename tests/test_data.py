"""Data: layouts recognised without options, column mapping, clear errors, answer masks for
several tokenizers (including the embedded SmolLM2's), padding, sampling and RD pairing."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from tiny_models import tiny_tokenizer

from sku_fast.errors import DataError
from sku_fast.unlearn.batches import Sampler, answer_groups, random_answers
from sku_fast.unlearn.data import Anchor, QAPair, demo_data_path, load_anchors, load_qa_pairs
from sku_fast.unlearn.tokens import IGNORE_INDEX, TokenRow, collate, format_pair, tokenize_pair


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# --- layouts ---------------------------------------------------------------------------------


def test_pku_saferlhf_layout_keeps_only_unsafe_responses(tmp_path):
    rows = [
        {"prompt": "p1", "response_0": "safe", "response_1": "bad1",
         "is_response_0_safe": True, "is_response_1_safe": False, "better_response_id": 0},
        {"prompt": "p2", "response_0": "bad2", "response_1": "bad3",
         "is_response_0_safe": False, "is_response_1_safe": False, "better_response_id": 1},
        {"prompt": "p3", "response_0": "ok", "response_1": "ok too",
         "is_response_0_safe": True, "is_response_1_safe": True, "better_response_id": 1},
    ]  # fmt: skip
    pairs = load_qa_pairs(_jsonl(tmp_path / "pku.jsonl", rows))
    assert pairs == [QAPair("p1", "bad1"), QAPair("p2", "bad2"), QAPair("p2", "bad3")]


def test_beavertails_prompt_unsafe_layout(tmp_path):
    rows = [{"prompt": "q", "safe": "I cannot help.", "unsafe": "harmful answer"}]
    assert load_qa_pairs(_jsonl(tmp_path / "b.jsonl", rows)) == [QAPair("q", "harmful answer")]


def test_chat_conversations_in_a_json_list(tmp_path):
    rows = [
        {"conversations": [{"role": "user", "content": "u1"},
                           {"role": "assistant", "content": "a1"}]},
        {"conversations": [{"from": "human", "value": "u2"}, {"from": "gpt", "value": "a2"},
                           {"from": "human", "value": "u3"}, {"from": "gpt", "value": "a3"}]},
    ]  # fmt: skip
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(rows))
    assert load_qa_pairs(path) == [QAPair("u1", "a1"), QAPair("u2", "a2"), QAPair("u3", "a3")]


def test_truthfulqa_csv_layout(tmp_path):
    path = tmp_path / "TruthfulQA.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Type", "Category", "Question", "Best Answer", "Correct Answers"])
        writer.writerow(["Adversarial", "Misc", "Is the sky, blue?", 'Yes, "mostly".', "a; b"])
    assert load_qa_pairs(path) == [QAPair("Is the sky, blue?", 'Yes, "mostly".')]


def test_json_lines_in_a_json_file_and_column_mapping(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('{"q": "one", "a": "1", "other": "x"}\n{"q": "two", "a": "2", "other": "y"}\n')
    assert load_qa_pairs(path, "q", "a") == [QAPair("one", "1"), QAPair("two", "2")]
    assert load_qa_pairs(path, "q", "other") == [QAPair("one", "x"), QAPair("two", "y")]


def test_generic_columns_are_detected_and_empty_rows_dropped(tmp_path):
    rows = [{"instruction": "do", "output": "done"}, {"instruction": "", "output": "x"}]
    assert load_qa_pairs(_jsonl(tmp_path / "g.jsonl", rows)) == [QAPair("do", "done")]


def test_demo_data_ships_with_the_package():
    harmful, normal = (load_qa_pairs(demo_data_path(n)) for n in ("harmful", "normal"))
    assert len(harmful) >= 40 and len(normal) >= 40
    assert len({p.answer for p in harmful}) == len(harmful)
    with pytest.raises(DataError, match="unknown demo data set 'evil'"):
        demo_data_path("evil")


# --- errors ----------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl' does not exist"):
        load_qa_pairs(tmp_path / "nope.jsonl")


def test_wrong_column_names_the_columns(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"q": "x", "a": "y"}])
    with pytest.raises(DataError, match="column 'question' not found; columns are a, q"):
        load_qa_pairs(path, "question", "a")
    with pytest.raises(DataError, match="cannot tell the prompt and answer columns apart"):
        load_qa_pairs(path)


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("empty.jsonl", "", "has no rows"),
        ("empty.csv", "prompt,answer\n", "has no rows"),
        ("blank.jsonl", '{"prompt": "", "answer": ""}\n', "no usable question/answer pair"),
        ("bad.jsonl", '{"prompt": "x"\n', r"bad\.jsonl:1: not valid JSON"),
        ("data.txt", "x", "unknown extension '.txt'"),
    ],
    ids=["empty-jsonl", "header-only-csv", "all-empty", "bad-json", "txt"],
)
def test_bad_files(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=message):
        load_qa_pairs(tmp_path / name)


def test_anchors_need_prompt_answer_and_refusal(tmp_path):
    row = {"prompt": " How do I shoot a sunset? ", "answer": "Use a tripod.", "refusal": "No."}
    path = _jsonl(tmp_path / "anchors.jsonl", [row])
    assert load_anchors(path) == [Anchor("How do I shoot a sunset?", "Use a tripod.", "No.")]
    path = _jsonl(tmp_path / "bad.jsonl", [row, {"prompt": "p", "answer": "a", "refusal": " "}])
    with pytest.raises(DataError, match="row 1 needs non-empty text in each of the columns "
                                        "prompt, answer, refusal"):  # fmt: skip
        load_anchors(path)
    with pytest.raises(DataError, match=r"anchor file '.*nope\.jsonl' does not exist"):
        load_anchors(tmp_path / "nope.jsonl")


def test_saved_dataset_directories_load(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"prompt": ["p"], "unsafe": ["u"]}).save_to_disk(tmp_path / "ds")
    assert load_qa_pairs(tmp_path / "ds") == [QAPair("p", "u")]
    splits = datasets.DatasetDict(
        {
            "test": datasets.Dataset.from_dict({"question": ["t"], "answer": ["x"]}),
            "train": datasets.Dataset.from_dict({"question": ["q"], "answer": ["a"]}),
        }
    )
    splits.save_to_disk(tmp_path / "splits")
    assert load_qa_pairs(tmp_path / "splits") == [QAPair("q", "a")]  # the train split
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="cannot load a dataset from directory"):
        load_qa_pairs(tmp_path / "empty")


# --- answer masks ----------------------------------------------------------------------------


def _demo_texts() -> list[str]:
    pairs = load_qa_pairs(demo_data_path("harmful")) + load_qa_pairs(demo_data_path("normal"))
    return [text for pair in pairs for text in (pair.prompt, pair.answer)]


def _wordpiece():
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    texts = _demo_texts()
    tok.train_from_iterator(
        texts, trainers.WordPieceTrainer(vocab_size=400, special_tokens=special)
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[SEP]"
    )


def _metaspace():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    texts = _demo_texts()
    tok.train_from_iterator(
        texts,
        trainers.UnigramTrainer(
            vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
        ),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def smollm2():
    from sku_fast.unlearn.models import load_tokenizer

    return load_tokenizer(None)


TOKENIZERS = {
    "bytelevel-bpe": lambda: tiny_tokenizer(),
    "bpe-chat-template": lambda: tiny_tokenizer(chat=True),
    "wordpiece-cls-sep": _wordpiece,
    "unigram-metaspace": _metaspace,
}
PAIRS = [
    QAPair("What is the capital of France?", "Paris."),
    QAPair("How can I steal a bike?", "Sure, take one nobody watches."),
    QAPair("Greet me", "Hello there."),
]


def _check_mask(tokenizer, pair: QAPair) -> None:
    row = tokenize_pair(tokenizer, pair.prompt, pair.answer, max_length=512)
    prompt_text, _ = format_pair(tokenizer, pair.prompt, pair.answer)
    ids = list(row.input_ids)
    answer = tokenizer.decode(ids[row.answer_start :], skip_special_tokens=True)
    prompt = tokenizer.decode(ids[: row.answer_start], skip_special_tokens=False)
    # every answer token is counted, nothing else (WordPiece decodes "Paris ." with a space)
    # and the chat template's end of turn ("<|im_end|>\n") belongs to the answer
    assert "".join(answer.split()) == "".join(pair.answer.split())
    assert pair.prompt in prompt and pair.answer not in prompt
    plain_prompt = tokenizer(prompt_text, add_special_tokens=not tokenizer.chat_template)
    # at most the last prompt token merges into the answer
    assert len(plain_prompt["input_ids"]) - 1 <= row.answer_start <= len(plain_prompt["input_ids"])
    if not tokenizer.chat_template:
        assert ids[-1] == tokenizer.eos_token_id and prompt_text.startswith("### Question: ")


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_answer_mask_small_tokenizers(name):
    tokenizer = TOKENIZERS[name]()
    for pair in PAIRS:
        _check_mask(tokenizer, pair)


def test_answer_mask_embedded_smollm2(smollm2):
    for pair in PAIRS:
        _check_mask(smollm2, pair)
    row = tokenize_pair(smollm2, PAIRS[0].prompt, PAIRS[0].answer, max_length=512)
    assert smollm2.decode(row.input_ids[row.answer_start :]) == "Paris.<|im_end|>\n"


def test_truncation_keeps_the_answer():
    tokenizer = tiny_tokenizer()
    row = tokenize_pair(tokenizer, "why " * 200, "Paris is the capital.", max_length=32)
    assert len(row.input_ids) == 32
    answer = tokenizer.decode(row.input_ids[row.answer_start :], skip_special_tokens=True)
    assert answer.strip() == "Paris is the capital."


def test_collate_masks_prompt_and_padding():
    rows = [TokenRow((5, 6, 7, 8), 2), TokenRow((9, 10), 1)]
    batch = collate(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    i = IGNORE_INDEX
    assert batch["labels"].tolist() == [[i, i, 7, 8], [i, 10, i, i]]


# --- sampling --------------------------------------------------------------------------------


def test_sampler_is_a_seeded_permutation_per_epoch():
    sampler = Sampler(7, seed=3)
    first, second = sampler.take(0, 7), sampler.take(7, 7)
    assert sorted(first) == sorted(second) == list(range(7))
    assert first != second  # reshuffled every epoch
    assert Sampler(7, seed=3).take(5, 4) == first[5:] + second[:2]  # random access
    assert Sampler(7, seed=4).take(0, 7) != first


def test_random_disassociation_never_pairs_a_prompt_with_its_own_answer():
    answers = ["a", "b", "a", "c", "b", "d"]  # duplicates: equal text counts as own answer
    groups = answer_groups(answers)
    rng = np.random.default_rng(0)
    draws = random_answers(groups, list(range(6)) * 50, k=3, rng=rng)
    for i, drawn in zip(list(range(6)) * 50, draws, strict=True):
        assert len(drawn) == 3 and all(answers[j] != answers[i] for j in drawn)
    seen = {j for drawn in draws for j in drawn}
    assert seen == set(range(6))  # every other answer gets drawn


def test_random_disassociation_needs_two_answers():
    with pytest.raises(DataError, match="at least 2 different answers; the 3 samples share one"):
        answer_groups(["same", "same", "same"])
