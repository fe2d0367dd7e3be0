"""The HTTP API through a real server: answers, pagination, bounds and JSON errors."""

from __future__ import annotations

import base64
import shutil

import duckdb
import httpx
import pytest
from fastapi.testclient import TestClient

from kimera_core import query, semantic
from kimera_core.api import create_app
from kimera_core.entropy import identity_entropy
from kimera_core.identity import Geoid
from kimera_core.storage import Storage


@pytest.fixture(scope="module")
def client(api_url):
    with httpx.Client(base_url=api_url, timeout=30) as c:
        yield c


def _json_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["error"] and body["message"]
    return body


def test_healthz_names_the_stage_and_the_index(client):
    body = client.get("/healthz").json()
    assert body["status"] == "ok"
    assert (body["stage"], body["source"]) == ("read-new", "new")
    assert body["text_index"]["exists"] and not body["text_index"]["stale"]


def test_entropy_range_pages_by_cursor(client):
    first = client.get("/identities", params={"min_entropy": 1, "max_entropy": 2, "limit": 5})
    assert first.status_code == 200
    page = first.json()
    assert page["count"] == 5 and page["source"] == "new"
    assert all(1 <= item["entropy"] <= 2 for item in page["items"])
    second = client.get(
        "/identities",
        params={"min_entropy": 1, "max_entropy": 2, "limit": 5, "cursor": page["next_cursor"]},
    ).json()
    assert not {i["id"] for i in page["items"]} & {i["id"] for i in second["items"]}
    assert second["items"][0]["entropy"] <= page["items"][-1]["entropy"]


def test_identity_by_id_and_its_related_scars(client):
    scar = client.get("/identities", params={"identity_type": "scar", "limit": 1}).json()["items"][
        0
    ]
    gid = scar["related_ids"][0]
    got = client.get(f"/identities/{gid}")
    assert got.status_code == 200 and got.json()["id"] == gid
    related = client.get(f"/identities/{gid}/related", params={"limit": 100}).json()
    assert scar["id"] in {s["id"] for s in related["items"]}
    assert all(gid in s["related_ids"] for s in related["items"])


def test_related_scars_page_by_their_cursor(client):
    with_most = client.get("/identities", params={"identity_type": "scar", "limit": 200}).json()
    counts: dict[str, int] = {}
    for item in with_most["items"]:
        for gid in item["related_ids"]:
            counts[gid] = counts.get(gid, 0) + 1
    gid = max(counts, key=counts.get)
    everything = client.get(f"/identities/{gid}/related", params={"limit": 500}).json()["items"]
    assert len(everything) >= 2
    seen, cursor = [], None
    while True:
        params = {"limit": 1} | ({"cursor": cursor} if cursor else {})
        page = client.get(f"/identities/{gid}/related", params=params).json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [item["id"] for item in everything]


def _cursor(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


# The inputs of issue 12 that answered 500 or silently the first page: each is a 400 naming it.
BAD_INPUTS = {
    "cursor NaN": ("/identities", {"cursor": _cursor('[NaN,"x"]')}, "not finite"),
    "cursor Infinity": ("/identities", {"cursor": _cursor('[-Infinity,"x"]')}, "not finite"),
    "cursor 1e999": ("/identities", {"cursor": _cursor('[1e999,"x"]')}, "not finite"),
    "cursor 10**309": ("/identities", {"cursor": _cursor(f'[{10**309},"x"]')}, "not finite"),
    "cursor surrogate": ("/identities", {"cursor": _cursor('[1.5,"\\ud800"]')}, "surrogate"),
    "related surrogate": ("/identities/x/related", {"cursor": _cursor('["\\udfff"]')}, "surrogate"),
    "min_entropy nan": ("/identities", {"min_entropy": "nan"}, "finite"),
    "max_entropy inf": ("/identities", {"max_entropy": "inf"}, "finite"),
    "max_entropy 1e999": ("/identities", {"max_entropy": "1e999"}, "finite"),
}


@pytest.mark.parametrize(
    ("path", "params", "named"), list(BAD_INPUTS.values()), ids=list(BAD_INPUTS)
)
def test_non_finite_numbers_and_lone_surrogates_are_bad_requests(client, path, params, named):
    if path == "/identities/x/related":  # a real id: the cursor is judged, not the id
        gid = client.get("/identities", params={"identity_type": "geoid", "limit": 1}).json()
        path = f"/identities/{gid['items'][0]['id']}/related"
    body = _json_error(client.get(path, params=params), 400)
    assert body["error"] == "bad_request" and named in body["message"]


def test_search_ranks_multilingual_text(client):
    for q, needle in [
        ("bibliothèque", "bibliothèque"),
        ("المكتبة", "المكتبة"),
        ("図書館", "図書館"),
    ]:
        body = client.get("/search", params={"q": q, "limit": 3}).json()
        assert body["items"], q
        assert needle in body["items"][0]["raw"]
        assert body["items"][0]["score"] > 0


def test_search_without_a_match_is_an_empty_page(client):
    body = client.get("/search", params={"q": "xylophone"}).json()
    assert body["items"] == [] and body["next_offset"] is None


def test_unknown_ids_are_json_404s(client):
    _json_error(client.get("/identities/no-such-id"), 404)
    _json_error(client.get("/identities/no-such-id/related"), 404)
    _json_error(client.get("/no/such/path"), 404)


@pytest.mark.parametrize(
    ("path", "params", "status"),
    [
        ("/identities", {"limit": 0}, 422),
        ("/identities", {"limit": 501}, 422),
        ("/identities", {"min_entropy": "many"}, 422),
        ("/identities", {"min_entropy": 3, "max_entropy": 1}, 400),
        ("/identities", {"identity_type": "echo"}, 422),
        ("/identities", {"cursor": "garbage"}, 400),
        ("/search", {}, 422),
        ("/search", {"q": ""}, 422),
        ("/search", {"q": "   "}, 400),
        ("/search", {"q": "x" * 257}, 422),
        ("/search", {"q": "river", "offset": 10_001}, 422),
    ],
)
def test_bad_parameters_are_json_errors_with_a_message(client, path, params, status):
    _json_error(client.get(path, params=params), status)


def test_metrics_and_openapi_are_served(client):
    client.get("/identities", params={"limit": 1})
    text = client.get("/metrics").text
    assert "kimera_identity_operation_duration_seconds" in text
    spec = client.get("/openapi.json").json()
    assert {"/identities/{identity_id}", "/search", "/identities", "/healthz", "/metrics"} <= set(
        spec["paths"]
    )


def _semantic_ready() -> bool:
    try:
        semantic.model_dir()
        import tokenizers  # noqa: F401
    except (semantic.SemanticUnavailable, ImportError):
        return False
    return True


def test_semantic_search_finds_an_embedded_geoid_by_its_own_text(client, api_db):
    if not _semantic_ready():
        body = _json_error(client.get("/search/semantic", params={"q": "river"}), 503)
        assert body["error"] == "semantic_unavailable"
        return
    with duckdb.connect(str(api_db), read_only=True) as con:
        gid, raw = con.execute(
            "SELECT e.id, i.data->>'$.raw' FROM kimera_embeddings e JOIN identities i "
            "USING (id) ORDER BY e.id LIMIT 1"
        ).fetchone()
    body = client.get("/search/semantic", params={"q": raw, "limit": 5}).json()
    assert body["items"][0]["id"] == gid
    assert body["items"][0]["score"] == pytest.approx(1.0, abs=1e-3)
    scores = [item["score"] for item in body["items"]]
    assert scores == sorted(scores, reverse=True) and body["count"] == 5
    assert body["source"] == "new"


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({}, 422),
        ({"q": ""}, 422),
        ({"q": "  "}, 400),
        ({"q": "x" * 257}, 422),
        ({"q": "river", "limit": 0}, 422),
        ({"q": "river", "limit": 51}, 422),
    ],
)
def test_semantic_search_parameters_are_bounded(client, params, status):
    _json_error(client.get("/search/semantic", params=params), status)


def test_semantic_search_without_embeddings_is_a_503(tmp_path, api_db):
    path = tmp_path / "bare.duckdb"
    shutil.copy(api_db, path)
    with duckdb.connect(str(path)) as con:
        con.execute("DROP TABLE IF EXISTS kimera_embeddings")
    with TestClient(create_app(path)) as local:
        body = _json_error(local.get("/search/semantic", params={"q": "river"}), 503)
    expected = "embeddings_missing" if _semantic_ready() else "semantic_unavailable"
    assert body["error"] == expected


def test_an_api_on_a_writing_connection_serves_a_write_at_once(tmp_path, api_db):
    path = tmp_path / "writer.duckdb"
    shutil.copy(api_db, path)
    new = Geoid.new("a heron over the salt marsh", "en", tags=["a", "b", "c"]).to_identity()
    entropy = identity_entropy(new)
    with Storage.open(str(path)) as storage, TestClient(create_app(con=storage.con)) as local:
        params = {"min_entropy": entropy, "max_entropy": entropy, "limit": 500}
        before = local.get("/identities", params=params).json()
        assert new.id not in {i["id"] for i in before["items"]}
        storage.store(new)
        after = local.get("/identities", params=params).json()
        assert new.id in {i["id"] for i in after["items"]}
        assert local.get(f"/identities/{new.id}").json()["raw"] == new.raw


# --- a stage that reads legacy: the server's answers are the legacy scan's ----------------
@pytest.mark.parametrize(
    "filters",
    [
        {"min_entropy": 1, "max_entropy": 2},
        {"min_entropy": 0, "max_entropy": 0},  # ties at zero, by id
        {"identity_type": "scar", "max_entropy": 3},
        {"lang": "ar", "tag": "memory"},
    ],
)
def test_a_legacy_stage_server_pages_are_the_legacy_scans_pages(legacy_api, filters):
    path, url = legacy_api
    with (
        httpx.Client(base_url=url, timeout=30) as http,
        duckdb.connect(str(path), read_only=True) as con,
    ):
        cursor = None
        for _ in range(4):
            params = {**filters, "limit": 17, **({"cursor": cursor} if cursor else {})}
            served = http.get("/identities", params=params).json()
            scanned = query.find_identities_by_entropy(
                con, **{**filters, "cursor": cursor}, limit=17
            )
            assert served == scanned.to_dict() and served["source"] == "legacy"
            cursor = served["next_cursor"]
            if cursor is None:
                break


def test_a_legacy_stage_server_finds_by_id_and_text_in_legacy(legacy_api):
    path, url = legacy_api
    with (
        httpx.Client(base_url=url, timeout=30) as http,
        duckdb.connect(str(path), read_only=True) as con,
    ):
        assert http.get("/healthz").json()["text_index"]["source"] == "legacy"
        gid, scar = con.execute(
            "SELECT (SELECT min(gid) FROM legacy_geoids), (SELECT min(id) FROM legacy_scars)"
        ).fetchone()
        for key in (gid, scar):
            assert http.get(f"/identities/{key}").json() == (
                query.get_identity(con, key, source="legacy").to_dict()
            )
        found = http.get("/search", params={"q": "river", "limit": 5}).json()
        assert found["source"] == "legacy" and found["items"]
        assert found == query.search_text(con, "river", limit=5).to_dict()
