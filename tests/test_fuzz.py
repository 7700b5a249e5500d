"""Property-based fuzzing of the pool and target loaders (issue 9): whatever bytes a user
hands over, a loader returns well-formed examples or raises CcdsError (one clear line), never
another exception."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ccds import CcdsError, Example
from ccds.data.formats import load_examples
from ccds.data.sources import load_target_folder

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                    st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6)
keys = st.sampled_from(["id", "prompt", "response", "instruction", "input", "output",
                        "messages", "choices", "answer", "source", "question", "text", "x"])
rows = st.dictionaries(keys, values, max_size=5)
# near-valid rows: the right keys with wrong, empty or odd values
lines = st.one_of(rows.map(json.dumps), st.text(max_size=40),
                  st.binary(max_size=40).map(lambda b: b.decode("latin-1")))


def _check(load):
    try:
        out = load()
    except CcdsError as e:
        msg = str(e)
        assert msg and "\n" not in msg.strip(), msg
        return
    assert out and all(isinstance(e, Example) and isinstance(e.prompt, str)
                       and isinstance(e.response, str) and e.response for e in out)
    assert len({e.id for e in out}) == len(out)


@SETTINGS
@given(body=st.lists(lines, max_size=6))
def test_jsonl_pool_loader_never_crashes(tmp_path_factory, body):
    path = tmp_path_factory.mktemp("fuzz") / "pool.jsonl"
    path.write_text("\n".join(body), encoding="utf-8", errors="surrogatepass")
    _check(lambda: load_examples(path))


@SETTINGS
@given(raw=st.binary(max_size=200))
def test_raw_bytes_never_crash_the_loader(tmp_path_factory, raw):
    for name in ("pool.jsonl", "pool.json"):
        path = tmp_path_factory.mktemp("fuzz") / name
        path.write_bytes(raw)
        _check(lambda p=path: load_examples(p))


@SETTINGS
@given(data=st.one_of(values, st.lists(rows, max_size=4)))
def test_json_pool_loader_never_crashes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "pool.json"
    path.write_text(json.dumps(data))
    _check(lambda: load_examples(path))


@SETTINGS
@given(meta=st.one_of(values, st.fixed_dictionaries(
    {"name": st.one_of(st.text(max_size=8), st.integers())},
    optional={"metric": st.text(max_size=6), "extract": st.text(max_size=8)})),
       val=st.lists(lines, max_size=3), test=st.lists(lines, max_size=3))
def test_target_folder_loader_never_crashes(tmp_path_factory, meta, val, test):
    d = tmp_path_factory.mktemp("target")
    (d / "target.json").write_text(json.dumps(meta))
    (d / "val.jsonl").write_text("\n".join(val), encoding="utf-8", errors="surrogatepass")
    (d / "test.jsonl").write_text("\n".join(test), encoding="utf-8", errors="surrogatepass")
    try:
        t = load_target_folder(d)
    except CcdsError as e:
        assert str(e) and "\n" not in str(e).strip()
        return
    assert t.val and t.test
