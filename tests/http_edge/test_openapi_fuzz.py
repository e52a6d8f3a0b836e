"""The HTTP API against its own OpenAPI document (schemathesis): no 5xx, every
response as documented."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from .conftest import ThreadedEdge

CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
    schemathesis.checks.response_headers_conformance,
]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedEdge]:
    edge = ThreadedEdge(
        tmp_path_factory.mktemp("openapi"), rate=None, reply_timeout=0.2, max_reply_timeout=0.5
    )
    yield edge
    edge.close()


# schemathesis 4 draws from `random` inside its strategies, which Hypothesis deprecates
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
@pytest.mark.slow
def test_api_conforms_to_its_openapi_document(served: ThreadedEdge) -> None:
    """Every operation of /openapi.json, with schemathesis-generated requests (valid
    and invalid per the document): no 5xx, and every response as documented."""
    api = schemathesis.openapi.from_url(served.url + "/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert {op.path for op in operations} >= {"/events", "/webhooks/{source}", "/orders"}
    seen: dict[str, set[int]] = {}
    for operation in operations:
        modes = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]
        for mode in modes:
            strategy = operation.as_strategy(generation_mode=mode)

            @given(case=strategy)
            @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
            def run(case: schemathesis.Case) -> None:
                response = case.call(base_url=served.url)
                assert response.status_code < 500, (
                    case.method,
                    case.path,
                    case.headers,
                    response.status_code,
                    response.text,
                )
                seen.setdefault(f"{case.method} {case.path}", set()).add(response.status_code)
                case.validate_response(response, checks=CHECKS)

            try:
                run()
            except Unsatisfiable:
                # nothing to make invalid (no parameters, no body): negative mode is empty
                if mode is schemathesis.GenerationMode.POSITIVE:
                    raise
    # some generated requests got past the envelope parsers (to validation or further)
    assert seen["POST /events"] & {200, 202, 422, 504}, seen
