"""The fast registry reader agrees with tomllib on every file it accepts, and accepts the usual
shape (so a million sandboxes load quickly)."""

import tomllib

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.registry.toml_subset import parse_registry_subset

USUAL = '''# comment
[sandboxes.demo]
host = "127.0.0.1"                       # trailing comment
mask_request_host = "localhost:${PORT}"
mask_origin = false
ports = { 3000 = 32768, 80 = 8080 }

[sandboxes.b2]
host = "10.0.0.2"
auto_resume = true
state = "paused"
'''


def test_usual_shape_is_read_fast_and_identically():
    fast = parse_registry_subset(USUAL)
    assert fast is not None
    assert fast == tomllib.loads(USUAL)


def test_outside_the_subset_falls_back():
    for text in [
        '[sandboxes.a]\nhost = "a\\tb"\n',          # escape
        '[sandboxes."a"]\nhost = "x"\n',            # quoted key
        '[sandboxes.a]\nhost = "x"\nhost = "y"\n',  # duplicate key (tomllib: error)
        '[sandboxes.a]\n[sandboxes.a]\n',           # duplicate table
        '[other]\nx = 1\n',                         # other table
        'x = 1\n',                                  # key outside a table
        '[sandboxes.a]\nports = [1, 2]\n',          # array
        '[sandboxes.a]\nhost = \'x\'\n',            # literal string
        '[sandboxes.a]\nn = 01\n',                  # leading zero (invalid TOML)
        '[sandboxes.a]\nhost = "x" y\n',            # junk after a value
        '[[sandboxes.a]]\nhost = "x"\n',            # array of tables
        '[sandboxes.a.b]\nhost = "x"\n',            # nested table
        '[sandboxes.a]\nports = { 1 = 2, 1 = 3 }\n',
        '',
    ]:
        assert parse_registry_subset(text) is None, text


bare = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=8)
simple = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc"),
                                        blacklist_characters='"\\'), max_size=12)
value = st.one_of(
    simple.map(lambda s: f'"{s}"'),
    st.integers(-10**6, 10**6).map(str),
    st.sampled_from(["true", "false", "True", "01", "1_000", "'lit'", '"a\\"b"', "[1]"]),
    st.dictionaries(st.integers(0, 65535).map(str), st.integers(0, 65535), max_size=3).map(
        lambda d: "{ " + ", ".join(f"{k} = {v}" for k, v in d.items()) + " }"),
)
line = st.one_of(
    st.tuples(bare, value, st.sampled_from(["", " # c", "#c", " junk"])).map(
        lambda t: f"{t[0]} = {t[1]}{t[2]}"),
    bare.map(lambda s: f"[sandboxes.{s}]"),
    st.sampled_from(["", "# comment", "   ", "[sandboxes.x] # c", "[other]", "x.y = 1"]),
)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(st.lists(line, max_size=12))
def test_agrees_with_tomllib_whenever_it_accepts(lines):
    text = "\n".join(lines) + "\n"
    fast = parse_registry_subset(text)
    if fast is None:
        return
    assert fast == tomllib.loads(text), text
