"""A method's state belongs to its instance (issue 21): whether it reads the target follows
its own parameters, and a loaded encoder is never shared through the class."""

from __future__ import annotations

import pickle

import pytest

from ccds.data.synth import generate
from ccds.score import get_method
from ccds.score.embed import Embed


@pytest.fixture(scope="module")
def synth():
    return generate(seed=0, n_pool=40, n_test=4)


def test_needs_target_follows_the_parameters():
    assert not get_method("ppl").needs_target
    assert get_method("ppl", train_on_val=True).needs_target
    assert not get_method("cascade", cheap="random", expensive="ppl").needs_target
    assert get_method("cascade", cheap="bm25", expensive="ppl").needs_target
    assert get_method("cascade", cheap="random", expensive="ppl",
                      expensive_params={"train_on_val": True}).needs_target
    assert not get_method("ppl").needs_target  # an instance that needed it changed nothing


def test_the_target_is_in_the_key_only_when_read(synth):
    pool, targets = synth
    plain = get_method("ppl", variant="low")
    assert plain.key(pool, targets[0]) == plain.key(pool, None)
    trained = get_method("ppl", variant="low", train_on_val=True)
    assert trained.key(pool, targets[0]) != trained.key(pool, None)


def test_an_embed_encoder_belongs_to_its_instance():
    assert "_encoder" not in vars(Embed)
    short, long = get_method("embed", max_len=32), get_method("embed", max_len=128)
    assert short.encoder() is not long.encoder()
    assert (short.encoder().max_seq_length, long.encoder().max_seq_length) == (32, 128)
    shipped = pickle.loads(pickle.dumps(short))  # to a Ray actor: parameters, not weights
    assert shipped._encoder is None
    assert shipped.fingerprint() == short.fingerprint()
