"""Schema fuzzing of the served OpenAPI: bad input is answered with a problem, never a 500 or a hang."""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import pytest
from replicate.prediction import Prediction as ClientPrediction

from app.files.service import signed_download_url
from app.routes import API_PREFIXES, Access, inventory
from tests.conftest import Gateway
from tests.dashboard.support import browser, csrf_of, sign_in
from tests.dbtools import create_token, rows, token_row
from tests.fakes.relay import FakeRelay
from tests.helpers import create, wait_terminal

# FUZZ_SEED and FUZZ_CASES_PER_OPERATION explore further; the suite runs the fixed seed and
# budget, so a failure is replayable.
SEED = int(os.environ.get("FUZZ_SEED", "20261207"))
CASES_PER_OPERATION = int(os.environ.get("FUZZ_CASES_PER_OPERATION", "24"))
# A hang is a failure, not a slow case: every answer the fuzzer asks for is due well inside this.
CLIENT_TIMEOUT = 10.0
ADMIN_SECRET = "admin-canary-9d04b6e1f7"
UNKNOWN_TOKEN = "gw_" + "z" * 40
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32
LONG = "x" * 10_000
ODD_TEXT = "nul\x00 ctl\x01\x1b\x7f bidi\u202e emoji\U0001f600 \ufffe"
PROBLEM_JSON = "application/problem+json"

# Routes that call the upstream may pass on its failure as 502, 503 or 504 (as problems too).
UPSTREAM_TEMPLATES = {
    "/predictions", "/predictions/{prediction_id}", "/predictions/{prediction_id}/cancel",
    "/models/{owner}/{name}/predictions", "/deployments/{owner}/{name}/predictions",
    "/models/{owner}/{name}", "/models/{owner}/{name}/versions",
    "/models/{owner}/{name}/versions/{version_id}", "/outputs/{ref}/{name}", "/streams/{ref}",
}
# Answers that are not JSON by design, and what they are instead.
NON_JSON_ROUTES = {
    "/metrics": "text/plain",
    "/dashboard/usage.csv": "text/csv",
    "/dashboard/static/dashboard.css": "text/css",
}
# The dashboard's pages answer a browser: an error is a readable HTML page, a missing session a
# redirect to sign in. usage.csv is a download, so its errors are problems like the API's.
HTML_PAGE_PREFIXES = ("/dashboard", "/p/", "/replicate/p/")
# A byte download or an event stream answers 2xx with its own media type; its errors are problems.
DOWNLOAD_SUFFIXES = ("/download", "/streams/{ref}", "/outputs/{ref}/{name}")
# Answers whose body is one prediction, or a page of them: each must load in the official client.
PREDICTION_TEMPLATES = {
    "/predictions/{prediction_id}", "/predictions/{prediction_id}/cancel", "/predictions",
    "/models/{owner}/{name}/predictions", "/deployments/{owner}/{name}/predictions",
}
# Create bodies are read by hand (the gateway keeps unknown keys), so the document has no schema
# for them; this is the shape the routes accept.
PREDICTION_CREATE = {
    "type": "object", "required": ["input"],
    "properties": {
        "input": {"type": "object", "properties": {"prompt": {"type": "string"}}},
        "stream": {"type": "boolean"},
        "webhook": {"type": "string", "format": "uri"},
        "webhook_events_filter": {"type": "array", "items": {"enum": ["start", "output", "logs", "completed"]}},
    },
}
VERSION_CREATE = {**PREDICTION_CREATE, "required": ["version", "input"],
                  "properties": {**PREDICTION_CREATE["properties"],
                                 "version": {"type": "string", "enum": ["a" * 64]}}}
DASHBOARD_FORM = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "budget_usd": {"type": "string"},
                   "rpm_limit": {"type": "string"}, "max_in_flight": {"type": "string"},
                   "models": {"type": "string"}, "expires_at": {"type": "string"},
                   "budget_period": {"enum": ["total", "month"]}},
}
# Query parameters the document does not declare but the routes read.
UNDECLARED_QUERIES: dict[str, list[dict[str, str]]] = {
    "/predictions": [{"cursor": "not-a-cursor"}, {"cursor": LONG}, {"cursor": "%00\x00"},
                     {"created_after": "2025-13-45"}, {"created_before": "0001-01-01T00:00:00+14:00"},
                     {"created_after": "9999-12-31T23:59:59-23:59"}, {"source": "mobile"}],
    "/files": [{"cursor": "not-a-cursor"}, {"cursor": "\U0001f600" * 50}],
    "/dashboard/predictions": [{"cursor": "bogus"}, {"since": "2025-02-30"}, {"status": ODD_TEXT}],
    "/dashboard/usage": [{"since": "yesterday"}, {"until": "0000-00-00"}, {"group_by": "nothing"}],
    "/dashboard/usage.csv": [{"since": "1-1-1"}, {"until": LONG}, {"group_by": ODD_TEXT}],
    "/dashboard/tokens": [{"after": "\x00"}, {"only": LONG}],
    "/dashboard/login": [{"next": "//evil.example"}, {"next": LONG}],
    "/files/{file_id}/download": [{"expiry": "-1", "signature": "x"}, {"expiry": "9" * 40, "signature": ""}],
}


# ---- the served document -------------------------------------------------------------------

@dataclass(frozen=True)
class Operation:
    """One method and path template of the served document, with what it takes."""

    method: str
    template: str
    access: Access
    parameters: tuple[dict[str, Any], ...]
    body_schema: dict[str, Any] | None
    responses: dict[str, tuple[str, dict[str, Any]]]  # by status: the media type and its schema

    @property
    def api_template(self) -> str:
        """The template without the API prefix it is served under."""
        for prefix in API_PREFIXES:
            if self.template.startswith(prefix + "/"):
                return self.template[len(prefix):]
        return self.template

    @property
    def label(self) -> str:
        return f"{self.method} {self.template}"


def _resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        node: Any = document
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        schema = node
    return schema


def _operations(document: dict[str, Any]) -> list[Operation]:
    classes = inventory()
    found = []
    for template, methods in document["paths"].items():
        for method, spec in methods.items():
            body = spec.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            responses = {code: (media, _resolve(document, content.get("schema", {})))
                         for code, answer in spec.get("responses", {}).items()
                         for media, content in answer.get("content", {}).items()}
            found.append(Operation(
                method.upper(), template, classes[(method.upper(), template)],
                tuple(spec.get("parameters", [])), _resolve(document, body) if body else None, responses,
            ))
    return found


# ---- a small validator for the JSON Schema the document uses --------------------------------

_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def schema_errors(document: dict[str, Any], schema: dict[str, Any], value: Any, where: str = "$") -> list[str]:
    """Where `value` breaks `schema`: type, required, properties, items, enum, nullable, anyOf."""
    schema = _resolve(document, schema)
    if value is None and schema.get("nullable"):
        return []
    if "anyOf" in schema:
        options = [schema_errors(document, option, value, where) for option in schema["anyOf"]]
        return [] if any(not errors for errors in options) else [f"{where}: matches no anyOf option"]
    kind = schema.get("type")
    if kind and not _TYPES[kind](value):
        return [f"{where}: {type(value).__name__} is not {kind}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where}: {value!r} is not one of {schema['enum']}"]
    errors: list[str] = []
    if isinstance(value, dict):
        errors += [f"{where}.{name}: missing" for name in schema.get("required", []) if name not in value]
        for name, inner in schema.get("properties", {}).items():
            if name in value:
                errors += schema_errors(document, inner, value[name], f"{where}.{name}")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            errors += schema_errors(document, schema["items"], item, f"{where}[{index}]")
    return errors


def test_the_validator_catches_what_it_claims() -> None:
    schema = {"type": "object", "required": ["a"], "properties": {
        "a": {"type": "array", "items": {"enum": ["x"]}}, "b": {"type": "string", "nullable": True},
        "c": {"anyOf": [{"type": "integer"}, {"type": "null"}]}}}
    assert schema_errors({}, schema, {"a": ["x"], "b": None, "c": None}) == []
    assert schema_errors({}, schema, {"b": 1}) == ["$.a: missing", "$.b: int is not string"]
    assert schema_errors({}, schema, {"a": ["y"], "c": "1"}) == [
        "$.a[0]: 'y' is not one of ['x']", "$.c: matches no anyOf option"]


# ---- generating cases ------------------------------------------------------------------------

def valid_value(document: dict[str, Any], schema: dict[str, Any], rng: random.Random) -> Any:
    """A value `schema` accepts, varied by `rng`."""
    schema = _resolve(document, schema)
    if "anyOf" in schema:
        return valid_value(document, next(s for s in schema["anyOf"] if s.get("type") != "null"), rng)
    if "enum" in schema:
        return rng.choice(schema["enum"])
    kind = schema.get("type", "string")
    if kind == "object":
        properties = schema.get("properties", {})
        chosen = [n for n in properties if n in schema.get("required", []) or rng.random() < 0.3]
        return {name: valid_value(document, properties[name], rng) for name in chosen}
    if kind == "array":
        return [valid_value(document, schema.get("items", {}), rng)]
    if kind == "integer":
        return int(schema.get("minimum", 0)) + rng.randrange(1, 100)
    if kind == "number":
        return rng.choice([0.5, 2, 10.25])
    if kind == "boolean":
        return rng.random() < 0.5
    return {"date": "2026-01-15", "date-time": "2026-01-15T10:00:00Z",
            "uri": "https://hooks.example.com/in"}.get(schema.get("format", ""), f"fuzz-{rng.randrange(10**9)}")


def wrong_values(schema: dict[str, Any]) -> list[tuple[str, Any]]:
    """Values of the wrong type, or the right type at its extremes, for a field of `schema`."""
    return [
        ("null", None), ("empty string", ""), ("long string", LONG), ("odd characters", ODD_TEXT),
        ("negative", -1), ("huge integer", 10**40), ("huge float", 1e308), ("boolean", True),
        ("array", [1, "two", None]), ("object", {"nested": {"deeper": []}}),
        ("wrong type", 12345 if schema.get("type") == "string" else "not-a-number"),
    ]


@dataclass
class Case:
    """One request of the fuzzer and the credential it carries."""

    what: str
    path: str
    credential: str = "valid"  # or "none" or "unknown"
    params: dict[str, str] | None = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    data: dict[str, Any] | None = None
    files: dict[str, Any] | None = None


def _json_body(value: Any) -> tuple[bytes, dict[str, str]]:
    return json.dumps(value).encode(), {"Content-Type": "application/json"}


def deeply_nested(depth: int) -> bytes:
    """A JSON object nested `depth` levels down, as text a recursive parser may choke on."""
    return b'{"input":' + b'{"a":[' * depth + b"1" + b"]}" * depth + b"}"


def _body_cases(document: dict[str, Any], schema: dict[str, Any], rng: random.Random
                ) -> Iterator[tuple[str, dict[str, Any]]]:
    valid = valid_value(document, schema, rng)
    yield "a valid body", dict(zip(("content", "headers"), _json_body(valid), strict=True))
    for name in schema.get("required", []):
        yield f"no {name}", dict(zip(("content", "headers"), _json_body(
            {k: v for k, v in valid.items() if k != name}), strict=True))
    for name, inner in schema.get("properties", {}).items():
        for what, wrong in wrong_values(_resolve(document, inner)):
            yield f"{name} as {what}", dict(zip(("content", "headers"), _json_body({**valid, name: wrong}),
                                                 strict=True))
    yield "an unknown field", dict(zip(("content", "headers"), _json_body({**valid, "\x00odd": 1}), strict=True))
    json_type = {"Content-Type": "application/json"}
    raw = [
        ("not JSON", b"{not json"), ("invalid UTF-8", b'{"name": "\xff\xfe"}'),
        ("a lone surrogate", b'{"input": {"prompt": "\\ud800"}, "name": "\\udfff"}'),
        ("NaN", b'{"input": {"prompt": NaN}, "name": NaN}'), ("a JSON array", b"[]"), ("JSON null", b"null"),
        ("a JSON string", b'"text"'), ("an empty body", b""), ("whitespace", b" \n\t"),
        ("nesting 100 deep", deeply_nested(100)), ("nesting 5000 deep", deeply_nested(5000)),
        ("a 1 MB string", _json_body({"input": {"prompt": "y" * 1_000_000}})[0]),
    ]
    for what, content in raw:
        yield what, {"content": content, "headers": json_type}
    valid_text = _json_body(valid)[0]
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                         "application/json; charset=latin-1", "no/such-type"):
        yield f"as {content_type}", {"content": valid_text, "headers": {"Content-Type": content_type}}


def _form_cases(rng: random.Random, csrf: str) -> Iterator[tuple[str, dict[str, Any]]]:
    valid = {k: str(v) for k, v in valid_value({}, DASHBOARD_FORM, rng).items()}
    yield "a valid form", {"data": {**valid, "csrf": csrf}}
    yield "no csrf", {"data": valid}
    yield "a wrong csrf", {"data": {**valid, "csrf": "x" * 64}}
    for name in DASHBOARD_FORM["properties"]:
        for what, wrong in (("empty", ""), ("long", LONG), ("odd characters", ODD_TEXT), ("negative", "-1"),
                            ("huge", "9" * 60), ("a bad date", "2025-02-30T25:61")):
            yield f"{name} {what}", {"data": {**valid, name: wrong, "csrf": csrf}}
    yield "as JSON", {"content": _json_body({**valid, "csrf": csrf})[0],
                      "headers": {"Content-Type": "application/json"}}
    yield "not a form", {"content": b"\xff\x00%%%", "headers": {"Content-Type": "application/x-www-form-urlencoded"}}


def _upload_cases() -> Iterator[tuple[str, dict[str, Any]]]:
    yield "a valid upload", {"files": {"content": ("a.png", PNG, "image/png")}}
    yield "an empty file", {"files": {"content": ("e.png", b"", "image/png")}}
    yield "a long file name", {"files": {"content": (LONG, PNG, "image/png")}}
    yield "an odd file name", {"files": {"content": (ODD_TEXT + "/../x", PNG, "image/png")}}
    yield "an odd content type", {"files": {"content": ("a.png", PNG, "\x01no;type=")}}
    yield "another field name", {"files": {"file": ("a.png", PNG, "image/png")}}
    yield "metadata not JSON", {"files": {"content": ("a.png", PNG, "image/png")}, "data": {"metadata": "{"}}
    yield "metadata an array", {"files": {"content": ("a.png", PNG, "image/png")}, "data": {"metadata": "[1]"}}
    yield "a JSON body", {"content": b'{"content": "x"}', "headers": {"Content-Type": "application/json"}}
    yield "a broken multipart", {"content": b"--x\r\nnonsense", "headers": {"Content-Type": "multipart/form-data; boundary=x"}}
    yield "multipart without boundary", {"content": b"abc", "headers": {"Content-Type": "multipart/form-data"}}


ODD_SEGMENTS = [
    ("empty", ""), ("a dot", "."), ("two dots", ".."), ("an encoded slash", "a%2Fb"),
    ("an encoded NUL", "a%00b"), ("an encoded percent", "%25"), ("a bare percent", "%zz"),
    ("unicode", quote("ünïcødé\U0001f600")), ("control characters", quote("\x01\x1b\x7f")),
    ("very long", "a" * 10_000), ("a query-like segment", quote("?x=1#frag", safe="")),
    ("an encoded backslash", "a%5Cb"), ("spaces", "a%20b"), ("a negative number", "-1"),
]


def _substitute(template: str, values: dict[str, str]) -> str:
    path = template
    for name, value in values.items():
        path = path.replace("{" + name + "}", value)
    return path


def _query_cases(op: Operation, rng: random.Random) -> Iterator[tuple[str, dict[str, str]]]:
    for parameter in op.parameters:
        if parameter["in"] != "query":
            continue
        name, schema = parameter["name"], parameter.get("schema", {})
        yield f"{name} valid", {name: str(valid_value({}, schema, rng))}
        for what, wrong in (("empty", ""), ("long", LONG), ("odd characters", ODD_TEXT), ("negative", "-1"),
                            ("huge", "9" * 40), ("a bad date", "2025-02-30"), ("a float", "1.5e400")):
            yield f"{name} {what}", {name: wrong}
    for index, params in enumerate(UNDECLARED_QUERIES.get(op.api_template, [])):
        yield f"undeclared query {index}", params
    yield "an unknown odd parameter", {ODD_TEXT: ODD_TEXT}
    yield "a long unknown parameter", {"q": LONG}


# Any request may carry these; none of them may turn an answer into a 500.
ODD_HEADERS: list[tuple[str, dict[str, str]]] = [
    ("an Accept of XML", {"Accept": "application/xml"}),
    ("a Prefer that is not a number", {"Prefer": "wait=soon"}),
    ("a negative Prefer", {"Prefer": "wait=-1"}),
    ("an odd forwarded host and scheme", {"X-Forwarded-Host": "a b/c", "X-Forwarded-Proto": "gopher"}),
    ("a long header", {"X-Fuzz": LONG}),
    ("a gzip body that is not gzip", {"Content-Encoding": "gzip"}),
]


@dataclass
class Estate:
    """A gateway with real objects to aim at, and the credentials each class of route takes."""

    gateway: Gateway
    relay: FakeRelay
    document: dict[str, Any]
    token: str
    path_values: dict[str, str]
    capability_paths: dict[str, str]
    admin_session: httpx.Client
    csrf: str


def cases_for(op: Operation, estate: Estate) -> list[Case]:
    """A seeded, bounded set of cases for one operation."""
    rng = random.Random(f"{SEED} {op.label}")
    valid_path = estate.capability_paths.get(op.api_template) or _substitute(op.template, estate.path_values)
    cases = [Case("valid path", valid_path)]
    names = [p["name"] for p in op.parameters if p["in"] == "path"]
    for name in names:
        for what, segment in ODD_SEGMENTS:
            cases.append(Case(f"{name} {what}", _substitute(op.template, {**estate.path_values, name: segment})))
    for what, params in _query_cases(op, rng):
        cases.append(Case(f"query {what}", valid_path, params=params))
    if op.method in {"POST", "PATCH", "PUT"}:
        for what, request in _body_options(op, estate, rng):
            cases.append(Case(what, valid_path, **request))
    else:
        cases.append(Case("a body it does not read", valid_path, content=deeply_nested(5000),
                          headers={"Content-Type": "application/json"}))
    cases += [Case(what, valid_path, headers=headers) for what, headers in ODD_HEADERS]
    if "?" not in valid_path:
        cases += [Case("a trailing slash", valid_path + "/"), Case("a doubled slash", valid_path.replace("/", "//", 2))]
    # Keep the first (valid) case, sample the rest: the budget holds however the document grows.
    rest = cases[1:]
    chosen = [cases[0], *rng.sample(rest, min(len(rest), CASES_PER_OPERATION - 1))]
    if op.access in {Access.AUTHENTICATED, Access.ADMIN, Access.SESSION, Access.ADMIN_SESSION}:
        for case in rng.sample(chosen, len(chosen) // 5):
            case.credential = rng.choice(["none", "unknown"])
    return chosen


def _body_options(op: Operation, estate: Estate, rng: random.Random) -> Iterator[tuple[str, dict[str, Any]]]:
    if op.template.startswith("/dashboard"):
        return _form_cases(rng, estate.csrf)
    if op.api_template == "/files":
        return _upload_cases()
    if op.body_schema is not None:
        return _body_cases(estate.document, op.body_schema, rng)
    if op.api_template == "/predictions":
        return _body_cases(estate.document, VERSION_CREATE, rng)
    if op.api_template.endswith("}/predictions"):
        return _body_cases(estate.document, PREDICTION_CREATE, rng)
    # A route that reads no body must still shrug one off.
    return iter([("an unexpected body", {"content": b"\x00" * 64, "headers": {"Content-Type": "application/json"}}),
                 ("an unexpected JSON body", {"content": deeply_nested(5000),
                                              "headers": {"Content-Type": "application/json"}})])


# ---- sending and judging ---------------------------------------------------------------------

def _send(client: httpx.Client, op: Operation, case: Case, estate: Estate) -> httpx.Response:
    headers = dict(case.headers)
    if op.access in {Access.SESSION, Access.ADMIN_SESSION} and case.credential == "valid":
        headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in estate.admin_session.cookies.items())
    secret = {Access.AUTHENTICATED: estate.token, Access.ADMIN: ADMIN_SECRET}.get(op.access)
    if secret and case.credential == "valid":
        headers["Authorization"] = f"Bearer {secret}"
    elif case.credential == "unknown":
        headers["Authorization"] = f"Bearer {UNKNOWN_TOKEN}"
    client.cookies.clear()
    # The path goes as written: httpx would otherwise normalise away the dots and encodings under test.
    url = httpx.URL(estate.gateway.url).copy_with(raw_path=case.path.encode("ascii"))
    if case.params:
        url = url.copy_merge_params(case.params)
    return client.request(op.method, url, headers=headers, content=case.content, data=case.data,
                          files=case.files)


def _media_type(response: httpx.Response) -> str:
    return response.headers.get("content-type", "").split(";")[0].strip().lower()


def problems_with(op: Operation, response: httpx.Response, estate: Estate) -> list[str]:
    """What is wrong with one answer; empty when it keeps the promise."""
    status = response.status_code
    if status >= 500 and not (status in {502, 503, 504} and op.api_template in UPSTREAM_TEMPLATES):
        return [f"status {status}: {response.text[:300]!r}"]
    media = _media_type(response)
    page = op.template.startswith(HTML_PAGE_PREFIXES) and op.template not in NON_JSON_ROUTES
    if 300 <= status < 400:
        return _redirect_errors(response, page)
    if op.method == "HEAD":
        return []  # no body to judge; the status was judged above
    if status >= 400:
        if page and media == "text/html":
            return []
        # An address no page matches is the gateway's own 404, a problem like any other.
        return _problem_errors(response) or _conformance_errors(op, status, response, estate)
    if page:
        return [] if media == "text/html" else [f"page {status} as {media}"]
    expected = NON_JSON_ROUTES.get(op.template)
    if expected is not None or op.api_template.endswith(DOWNLOAD_SUFFIXES):
        return [] if expected is None or media == expected else [f"{status} as {media}, not {expected}"]
    if status == 204:
        return [] if not response.content else ["a 204 with a body"]
    if media != "application/json":
        return [f"{status} as {media}"]
    return _conformance_errors(op, status, response, estate) or _prediction_errors(op, response.json())


def _redirect_errors(response: httpx.Response, page: bool) -> list[str]:
    location = response.headers.get("location", "")
    if page and location:
        return []
    # The framework sends a path with a trailing slash (an empty last parameter too) to the path
    # without it; the route it lands on then judges the request.
    path = response.request.url.raw_path.split(b"?")[0].decode()
    if response.status_code == 307 and path.endswith("/") and urlsplit(location).path == path.rstrip("/"):
        return []
    return [f"redirect {response.status_code} to {location!r}"]


def _problem_errors(response: httpx.Response) -> list[str]:
    media = _media_type(response)
    if media != PROBLEM_JSON:
        return [f"error {response.status_code} as {media}: {response.text[:200]!r}"]
    body = response.json()
    errors = [f"problem without {key}" for key in ("title", "detail", "status") if key not in body]
    if body.get("status") != response.status_code:
        errors.append(f"problem status {body.get('status')} in a {response.status_code}")
    if not isinstance(body.get("title"), str) or not isinstance(body.get("detail"), str) or not body.get("detail"):
        errors.append(f"problem title or detail not text: {body!r:.200}")
    return errors


def _conformance_errors(op: Operation, status: int, response: httpx.Response, estate: Estate) -> list[str]:
    """A success must be documented; any answer the document describes must match it."""
    documented = op.responses.get(str(status))
    if documented is None:
        return [f"status {status} is not in the document ({sorted(op.responses)})"] if status < 400 else []
    media, schema = documented
    if _media_type(response) != media:
        return [f"{status} as {_media_type(response)}, documented as {media}"]
    return schema_errors(estate.document, schema, response.json())


def _prediction_errors(op: Operation, body: Any) -> list[str]:
    if op.api_template not in PREDICTION_TEMPLATES:
        return []
    errors = []
    # A dot segment may land a request for one prediction on the list: judge what came back.
    for prediction in body.get("results", [body]):
        try:
            ClientPrediction(**prediction)
        except (TypeError, ValueError) as exc:
            errors.append(f"not a client Prediction: {str(exc).splitlines()[0]}")
    return errors


# ---- the run ---------------------------------------------------------------------------------

def _capability_paths(gateway: Gateway, prediction: dict[str, Any], file_id: str) -> dict[str, str]:
    """Real capability URLs, as the gateway hands them out, so the valid case reaches the route's work."""
    key = hashlib.sha256(rows(gateway.db_url, "instance_key")[0]["key"].encode()).digest()
    signed = urlsplit(signed_download_url(gateway.replicate_base, key, token_row(gateway.db_url, "fuzzer")["id"],
                                          file_id, 600))
    return {"/streams/{ref}": urlsplit(prediction["urls"]["stream"]).path,
            "/files/{file_id}/download": f"{signed.path}?{signed.query}"}


@pytest.fixture
def estate(gateway_factory: Any, relay: FakeRelay) -> Iterator[Estate]:
    gateway: Gateway = gateway_factory(admin_token=ADMIN_SECRET)
    token = create_token(gateway.db_url, "fuzzer")
    # Admin and dashboard routes aim at these, so the fuzzer's own token outlives its deletes.
    create_token(gateway.db_url, "fuzz-target")
    with gateway.client(token) as api:
        prediction = wait_terminal(api, create(api).json()["id"])
        uploaded = api.post("/files", files={"content": ("a.png", PNG, "image/png")})
        assert uploaded.status_code == 201, uploaded.text
        document = httpx.get(gateway.url + "/openapi.json", timeout=CLIENT_TIMEOUT).json()
    group = httpx.post(gateway.url + "/admin/v1/groups", json={"name": "fuzz-group"},
                       headers={"Authorization": f"Bearer {ADMIN_SECRET}"}, timeout=CLIENT_TIMEOUT)
    assert group.status_code == 201, group.text
    file = uploaded.json()
    values = {
        "prediction_id": prediction["id"], "file_id": file["id"], "owner": "black-forest-labs",
        "name": "flux-schnell", "version_id": "a" * 64, "ref": f"{prediction['id']}.{'0' * 40}",
        "name_or_id": "fuzz-target", "token_id": token_row(gateway.db_url, "fuzz-target")["id"],
    }
    with browser(gateway) as admin_session:
        assert sign_in(admin_session, ADMIN_SECRET).status_code == 303
        csrf = csrf_of(admin_session.get("/dashboard/tokens"))
        yield Estate(gateway, relay, document, token, values,
                     _capability_paths(gateway, prediction, file["id"]),
                     admin_session, csrf)


def _run_order(op: Operation) -> tuple[bool, bool, str]:
    # Deleting or revoking the objects the other cases aim at comes after them, and signing out
    # ends the session every dashboard case uses: last of all.
    destroys = op.method == "DELETE" or op.template.endswith("/revoke")
    return op.template == "/dashboard/logout", destroys, op.label


def judge(client: httpx.Client, op: Operation, case: Case, estate: Estate) -> list[str]:
    """Send one case; what is wrong with how it was answered."""
    where = f"{op.label} [{case.what}, {case.credential}]"
    try:
        response = _send(client, op, case, estate)
    except httpx.TimeoutException:
        return [f"{where}: no answer in {CLIENT_TIMEOUT} s"]
    except httpx.TransportError as exc:
        return [f"{where}: {type(exc).__name__} {exc}"]
    failures = [f"{where} -> {problem}" for problem in problems_with(op, response, estate)]
    if (case.credential != "valid" and op.access in {Access.AUTHENTICATED, Access.ADMIN}
            and response.status_code not in {307, 401, 403, 404, 405}):
        failures.append(f"{where} -> {response.status_code} without a valid credential")
    return failures


# The document does not list itself; the estate fixture reads it, and nothing in it is input.
UNDOCUMENTED_ROUTES = {("GET", "/openapi.json"), ("HEAD", "/openapi.json")}


def test_every_operation_answers_bad_input_with_a_problem(estate: Estate) -> None:
    operations = sorted(_operations(estate.document), key=_run_order)
    documented = {(op.method, op.template) for op in operations}
    assert documented == inventory().keys() - UNDOCUMENTED_ROUTES
    creates_before = len(estate.relay.creates())
    failures: list[str] = []
    sent = creates_sent = 0
    with httpx.Client(timeout=CLIENT_TIMEOUT, follow_redirects=False) as client:
        for op in operations:
            cases = cases_for(op, estate)
            assert len(cases) >= 10, (op.label, len(cases))
            sent += len(cases)
            if op.method == "POST" and op.api_template.endswith("/predictions"):
                creates_sent += len(cases)
            for case in cases:
                failures += judge(client, op, case, estate)
    assert not failures, f"{len(failures)} of {sent} cases failed:\n" + "\n".join(failures)
    # The relay sees a create only for a case that reached it: never more than were sent.
    assert len(estate.relay.creates()) - creates_before <= creates_sent
