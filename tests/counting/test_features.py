"""Offline feature files (data.hidden_states_path / --hidden-states-path): the data tokens as
SpecForge's builder counts them, the positions training puts loss on, and bad files named."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from conftest import masked_by_hand, save_feature, write_text

from specforge_vocab.counting.features import (
    iter_feature_files,
    list_feature_files,
    read_feature_sample,
    training_positions,
)
from specforge_vocab.counting.pretokenized import count_masked_ids
from specforge_vocab.errors import InputError


@pytest.fixture()
def feature_dir(tmp_path, tokenized_records):
    """Feature files laid out like prepare_hidden_states.py: rows_<a>-<b>/data_<i>.ckpt[.gz],
    input_ids/loss_mask with and without a batch dimension, plus hidden states."""
    root = tmp_path / "hidden_states"
    names = []
    for i, (ids, mask) in enumerate(tokenized_records):
        ids_t, mask_t = torch.tensor(ids), torch.tensor(mask)
        if i % 2:
            ids_t, mask_t = ids_t[None], mask_t[None]
        record = {
            "input_ids": ids_t,
            "loss_mask": mask_t,
            "hidden_state": torch.randn(1, len(ids), 8),
            "aux_hidden_state": torch.randn(1, len(ids), 24),
        }
        name = f"rows_{i // 2 * 2}-{i // 2 * 2 + 2}/data_{i}.ckpt" + (".gz" if i == 2 else "")
        save_feature(root / name, record, compress=i == 2)
        names.append(name)
    write_text(root / "rows_0-2" / "README.txt", "not a feature file")
    return root, names


@pytest.mark.parametrize("max_length", [7, 2048])
def test_feature_files_match_a_hand_count(feature_dir, tokenized_records, max_length):
    root, names = feature_dir
    files = list_feature_files(str(root))
    assert files == sorted(str(root / n) for n in names)
    by_name = {str(root / n): rec for n, rec in zip(names, tokenized_records)}
    expected = [masked_by_hand(*by_name[f], max_length) for f in files]
    got = list(iter_feature_files(str(root), max_length, vocab_size=128256))
    assert [g.tolist() for g in got] == expected
    hand = Counter(t for e in expected for t in e)
    counts = count_masked_ids(got, 128256)
    assert counts.dtype == np.int64 and counts.shape == (128256,)
    assert {int(t): int(counts[t]) for t in np.flatnonzero(counts)} == dict(hand)
    ranks = [[a.tolist() for a in iter_feature_files(str(root), max_length, rank=r, world_size=3)] for r in range(3)]
    assert ranks == [expected[0::3], expected[1::3], expected[2::3]]
    assert list_feature_files(files[0]) == [files[0]]


class NotATensor:
    pass


@pytest.mark.parametrize(
    "record, fragment",
    [
        ({"input_ids": torch.tensor([1, 2])}, "has no loss_mask"),
        ({"loss_mask": torch.tensor([1, 2])}, "has no input_ids"),
        ({"input_ids": [1, 2], "loss_mask": torch.tensor([1, 1])}, "'input_ids' must be a tensor"),
        ({"input_ids": torch.tensor([1.0, 2.0]), "loss_mask": torch.tensor([1, 1])}, "must be an integer tensor"),
        (
            {"input_ids": torch.tensor([1, 2, 3]), "loss_mask": torch.tensor([1, 1])},
            "input_ids has 3 entries but loss_mask has 2",
        ),
        ({"input_ids": torch.tensor([1, 128256]), "loss_mask": torch.tensor([1, 1])}, "token id 128256"),
        ({"input_ids": torch.tensor([-1, 2]), "loss_mask": torch.tensor([1, 0])}, "negative token id -1"),
        ([torch.tensor([1])], "must hold a dict of tensors"),
        ({"input_ids": torch.tensor([1]), "loss_mask": torch.tensor([1]), "meta": NotATensor()}, "weights_only=True"),
    ],
)
def test_bad_feature_files_are_named(tmp_path, record, fragment):
    path = save_feature(tmp_path / "f" / "data_0.ckpt", record)
    with pytest.raises(InputError) as info:
        list(iter_feature_files(str(tmp_path / "f"), 2048, vocab_size=128256))
    assert fragment in str(info.value) and str(path) in str(info.value)


def test_broken_and_missing_feature_files(tmp_path):
    good = save_feature(tmp_path / "f" / "data_0.ckpt", {"input_ids": torch.arange(50), "loss_mask": torch.ones(50)})
    data = good.read_bytes()
    write_text(tmp_path / "g" / "data_0.ckpt", "").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="not a readable torch feature file"):
        list(iter_feature_files(str(tmp_path / "g"), 10))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"no \*\.ckpt or \*\.ckpt\.gz"):
        list_feature_files(str(tmp_path / "empty"))
    with pytest.raises(InputError, match="does not exist"):
        list_feature_files(str(tmp_path / "nope"))
    # a float loss mask counts where it is non-zero, as in SpecForge's own counter
    save_feature(
        tmp_path / "h" / "x.ckpt", {"input_ids": torch.tensor([4, 5, 6]), "loss_mask": torch.tensor([0.0, 1.0, 1.0])}
    )
    assert next(iter_feature_files(str(tmp_path / "h"), 10)).tolist() == [5, 6]


def test_gzip_content_under_a_plain_name_is_named(tmp_path):
    record = {"input_ids": torch.arange(3), "loss_mask": torch.ones(3)}
    path = save_feature(tmp_path / "f" / "data_0.ckpt", record, compress=True)
    with pytest.raises(InputError, match="is gzip-compressed but its name does not end in .gz") as info:
        list(iter_feature_files(str(tmp_path / "f"), 10))
    assert str(path) in str(info.value)


def test_training_positions_and_teacher_rows(tmp_path):
    """Truncated to max_length, the last kept position zeroed, the teacher is the next stored row."""
    hidden = torch.arange(8 * 2, dtype=torch.float32).reshape(8, 2).to(torch.bfloat16)
    mask = torch.tensor([0, 1, 1, 0, 1, 1, 1, 1])
    record = {"input_ids": torch.arange(10, 18), "loss_mask": mask, "hidden_state": hidden[None]}
    path = save_feature(tmp_path / "data_0.ckpt", record)
    for max_length, positions in [(8, [1, 2, 4, 5, 6]), (6, [1, 2, 4]), (2, [])]:
        sample = read_feature_sample(str(path), max_length, hidden=True)
        assert training_positions(mask[:max_length].numpy()).tolist() == positions
        assert torch.equal(sample.teacher_hidden, hidden[[p + 1 for p in positions]])
        assert sample.masked_ids.tolist() == masked_by_hand(range(10, 18), mask.tolist(), max_length)
