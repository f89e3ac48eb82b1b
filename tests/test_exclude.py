"""The factor-data recipe's window filter: kfac_edit.data.exclude_overlapping."""

import torch

from kfac_edit.data import exclude_overlapping, record_ngrams, window_overlaps


def _batch(rows, mask=None):
    ids = torch.tensor(rows, dtype=torch.long)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids) if mask is None else torch.tensor(mask),
        "window_index": torch.arange(len(rows)),
    }


def test_drops_exactly_the_windows_sharing_an_8gram():
    record = list(range(100, 124))  # 24 tokens
    clean = list(range(16))
    hit = list(range(4)) + record[5:13] + list(range(4))  # shares record[5:13], one 8-gram
    near = list(range(4)) + record[5:12] + [0] * 5  # shares only 7 consecutive tokens
    split = record[:4] + [1] + record[4:8] + [2] + record[8:14]  # many record tokens, no 8 in a row
    out = list(exclude_overlapping([_batch([clean, hit, near, split])], [record]))
    assert len(out) == 1
    assert out[0]["window_index"].tolist() == [0, 2, 3]
    assert out[0]["input_ids"].tolist() == [clean, near, split]
    # n = 7 catches the near window too
    out7 = list(exclude_overlapping([_batch([clean, hit, near])], [record], n=7))
    assert out7[0]["window_index"].tolist() == [0]


def test_padding_is_ignored_and_empty_batches_are_skipped():
    record = [5, 6, 7, 8]  # shorter than n: matches only whole
    padded = [1, 5, 6, 7, 8, 0, 0, 0]
    mask = [[1, 1, 1, 1, 1, 0, 0, 0]]
    assert list(exclude_overlapping([_batch([padded], mask)], [record])) == []
    masked_out = [[1, 5, 6, 7, 0, 0, 0, 0]]
    kept = list(exclude_overlapping([_batch(masked_out, mask)], [record]))  # the record is not there whole
    assert kept[0]["input_ids"].shape == (1, 8)
    other = list(exclude_overlapping([_batch([padded], mask), _batch([[9] * 8])], [record]))
    assert [b["input_ids"].tolist() for b in other] == [[[9] * 8]]


def test_ngram_index():
    grams, lengths = record_ngrams([[1, 2, 3], list(range(10))], n=8)
    assert lengths == {3, 8}
    assert len(grams) == 1 + 3  # the short record whole, three 8-grams of the long one
    assert window_overlaps([0, 1, 2, 3, 0], grams, lengths)
    assert not window_overlaps([1, 2, 0, 3], grams, lengths)
    assert window_overlaps(list(range(2, 10)), grams, lengths)
