"""Property-based fuzzing of the OpenAPI document: no request makes the server fail.

Page cursors (OpenAPI format ``api.CURSOR_FORMAT``) are generated as the API makes them,
base64url JSON, holding what a client could forge: NaN and infinities, integers beyond the
double range, lone surrogates, other shapes; a bad one is a 400 ``bad_request``.
"""

from __future__ import annotations

import base64
import json

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kimera_core.api import CURSOR_FORMAT

EXAMPLES_PER_OPERATION = 40

surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
cursor_texts = st.text(alphabet=st.one_of(st.characters(), surrogates), max_size=12)
cursor_atoms = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=10**300, max_value=10**320),
    st.floats(allow_nan=True, allow_infinity=True),
    cursor_texts,
)
cursor_values = st.one_of(
    st.tuples(st.floats(allow_nan=True, allow_infinity=True), cursor_texts).map(list),
    st.tuples(cursor_texts).map(list),
    st.recursive(
        cursor_atoms,
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(cursor_texts, inner, max_size=2)
        ),
        max_leaves=6,
    ),
)


def _encoded(value) -> str:
    text = json.dumps(value, allow_nan=True)  # NaN/Infinity tokens, \ud800 escapes
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


cursors = st.one_of(cursor_values.map(_encoded), st.text(max_size=40)).filter(
    lambda c: len(c) <= 512
)


def test_no_generated_request_gets_a_server_error(api_url):
    schemathesis.openapi.format(CURSOR_FORMAT, cursors)
    schema = schemathesis.openapi.from_url(f"{api_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 6
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def check(case):
            response = case.call(base_url=api_url, timeout=30)
            assert response.status_code < 500, (case.path, case.query, response.text[:300])
            if response.status_code >= 400:
                body = response.json()
                assert body["error"] and body["message"]
            if (case.query or {}).get("cursor") and response.status_code == 400:
                assert response.json()["error"] == "bad_request"

        check()


def test_forged_cursors_are_a_page_or_a_bad_request(api_url):
    with httpx.Client(base_url=api_url, timeout=30) as client:
        scar = client.get("/identities", params={"identity_type": "scar", "limit": 1}).json()
        paths = ["/identities", f"/identities/{scar['items'][0]['related_ids'][0]}/related"]

        @given(cursor=cursors, path=st.sampled_from(paths))
        @settings(
            max_examples=150,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def check(cursor, path):
            response = client.get(path, params={"cursor": cursor, "limit": 2})
            assert response.status_code in (200, 400), (cursor, response.text[:300])
            if response.status_code == 400:
                body = response.json()
                assert body["error"] == "bad_request" and "cursor" in body["message"]

        check()


def test_the_cursor_strategy_reaches_the_hard_cases():
    seen = {"NaN": False, "Infinity": False, "\\ud": False, "e+": False}

    @given(value=cursor_values)
    @settings(max_examples=300, derandomize=True, database=None)
    def collect(value):
        text = json.dumps(value, allow_nan=True)
        for token in seen:
            seen[token] = seen[token] or token in text

    collect()
    assert all(seen.values()), seen
