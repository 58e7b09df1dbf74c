"""The query service answers as its OpenAPI schema says: schemathesis generates requests from
/openapi.json (bounded examples, valid and invalid) and checks every answer: no 5xx,
documented status codes, content types and bodies that match the schema."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import positive_data_acceptance

from components.config import with_overrides
from components.serving.app import create_app
from components.serving.live import LiveIndex

LIMITS = {"serve.max_upload_bytes": 100_000, "serve.max_upload_pixels": 1_000_000, "serve.max_images": 4}


def test_every_answer_matches_the_openapi_schema(live_ws, params):
    small = with_overrides(params, LIMITS)
    live = LiveIndex(live_ws, small.registry, small.index, refresh_seconds=small.serve.refresh_seconds)
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(live, small.serve, small.ingest))
    checked = []
    for found in schema.get_all_operations():
        operation = found.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def answers_as_documented(case: schemathesis.Case) -> None:
            # No 5xx; status code, content type and body as the schema says. Not "schema-valid data is
            # accepted": no schema can say which bytes are a decodable image, so random bytes get a 400.
            case.call_and_validate(excluded_checks=[positive_data_acceptance])

        answers_as_documented()
        checked.append(operation.label)
    assert sorted(checked) == [
        "GET /classes",
        "GET /classes/{name}",
        "GET /compare/random",
        "GET /health",
        "GET /history",
        "GET /images/{image_id}",
        "GET /live",
        "GET /map",
        "GET /progress",
        "GET /random",
        "GET /status",
        "GET /status/heatmap.png",
        "POST /compare",
        "POST /live/refresh",
        "POST /query",
    ]


def test_the_schema_documents_the_error_answers_and_at_least_one_image(live_ws, params):
    live = LiveIndex(live_ws, params.registry, params.index, refresh_seconds=params.serve.refresh_seconds)
    openapi = create_app(live, params.serve, params.ingest).openapi()
    query = openapi["paths"]["/query"]["post"]
    assert {"400", "413", "503", "422"} <= set(query["responses"])
    body = query["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[1]
    assert openapi["components"]["schemas"][body]["properties"]["image"]["minItems"] == 1
