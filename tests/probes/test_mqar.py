import pytest
import torch

from seqbench.probes.mqar import FILLER, IGNORE, mqar_batch


def batch(n=64, seq_len=64, n_pairs=8, vocab=128, seed=0):
    return mqar_batch(n, seq_len, n_pairs, vocab, torch.Generator().manual_seed(seed))


def test_keys_and_values_come_from_disjoint_halves_and_keys_are_distinct():
    tokens, _ = batch()
    keys, values = tokens[:, 0:16:2], tokens[:, 1:16:2]  # the context: k1 v1 ... k8 v8
    assert ((keys >= 1) & (keys < 64)).all() and ((values >= 64) & (values < 128)).all()
    assert all(len(set(row.tolist())) == 8 for row in keys)


def test_each_key_is_queried_once_and_labelled_with_its_value():
    tokens, labels = batch()
    for t, y in zip(tokens.tolist(), labels.tolist(), strict=True):
        pairs = dict(zip(t[0:16:2], t[1:16:2], strict=True))
        queries = [i for i, lab in enumerate(y) if lab != IGNORE]
        assert sorted(t[i] for i in queries) == sorted(pairs)  # every key once, nothing else
        assert all(i >= 16 and y[i] == pairs[t[i]] and t[i + 1] == pairs[t[i]] for i in queries)
        # off the queries and their answers, the query region holds only filler
        answered = {i for q in queries for i in (q, q + 1)}
        assert all(t[i] == FILLER for i in range(16, 64) if i not in answered)


def test_labels_only_at_the_query_positions():
    _, labels = batch(n=8, seq_len=40, n_pairs=5)
    assert ((labels != IGNORE).sum(dim=1) == 5).all()
    assert (labels[:, :10] == IGNORE).all()  # never in the context


def test_same_seed_same_data_other_seed_other_data():
    a, la = batch(seed=3)
    b, lb = batch(seed=3)
    c, _ = batch(seed=4)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert (a != c).any(dim=1).all()  # every sequence differs, not just one


def test_queries_land_anywhere_in_the_query_region():
    _, labels = batch(n=512, seq_len=64, n_pairs=4)
    positions = set((labels != IGNORE).nonzero()[:, 1].tolist())
    assert positions == set(range(8, 64, 2))  # every 2-token slot after the context is used by some sequence


@pytest.mark.parametrize(("seq_len", "n_pairs", "vocab", "match"), [
    (31, 8, 128, "seq_len >= 4 \\* n_pairs"),
    (64, 8, 16, "fewer than 8 pairs"),
])
def test_impossible_shapes_are_refused(seq_len, n_pairs, vocab, match):
    with pytest.raises(ValueError, match=match):
        batch(seq_len=seq_len, n_pairs=n_pairs, vocab=vocab)
