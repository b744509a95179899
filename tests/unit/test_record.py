"""Registry records: the fast path for the common entries (a host, or a host and a Host mask)
decides exactly as the full validation does."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.registry.record import record_from_mapping

TEXT = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x17F), max_size=12)
HOSTISH = st.one_of(TEXT, st.sampled_from(["127.0.0.1", "10.0.0.7", "sbx-1.internal", "::1"]))
MASKISH = st.one_of(TEXT, st.sampled_from(["localhost:${PORT}", "localhost", "a b", "x\r\n"]))
IDS = st.one_of(st.sampled_from(["abc123", "demo"]), TEXT)


def _outcome(sandbox_id, data):
    try:
        r = record_from_mapping(sandbox_id, data)
    except ValueError as exc:
        return ("error", str(exc).partition(":")[0])
    return (r.sandbox_id, r.host, dict(r.ports), r.mask_request_host, r.token_sha256, r.state,
            r.auto_resume, r.options, r.masked_host(3000))


@given(IDS, HOSTISH, st.one_of(st.none(), MASKISH))
def test_fast_path_agrees_with_full_validation(sandbox_id, host, mask):
    """An entry the fast path takes gives the record the full validation would give; one it does
    not take is judged by the full validation (`state = "running"` changes nothing but forces it).
    """
    data = {"host": host} if mask is None else {"host": host, "mask_request_host": mask}
    fast = _outcome(sandbox_id, data)
    full = _outcome(sandbox_id, {**data, "state": "running"})
    if fast[0] == "error":
        assert full[0] == "error"
    else:
        assert full == fast
