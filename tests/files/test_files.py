"""The Files API end to end: uploads, reads, deletes, signed downloads and file inputs."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import replicate
from replicate.exceptions import ReplicateError

from app.files.service import (
    _find_file_urls,
    _replace,
    _url_heads,
    download_signature,
    signed_download_url,
)
from tests.conftest import Gateway
from tests.dbtools import create_token, execute, rows
from tests.fakes.relay import FakeRelay
from tests.helpers import assert_problem

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40 + b"\r\n--end"
FILE_KEYS = {"id", "name", "content_type", "size", "etag", "checksums", "metadata", "created_at",
             "expires_at", "urls"}
STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z\Z")


def _upload(api: httpx.Client, content: bytes = PNG, name: str = "photo.png", content_type: str = "image/png",
            **data: str) -> httpx.Response:
    return api.post("/files", files={"content": (name, content, content_type)}, data=data)


def _stored_files(gateway: Gateway) -> list[Path]:
    root = Path(gateway.settings.storage_dir)
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def _instance_key(gateway: Gateway) -> bytes:
    return hashlib.sha256(rows(gateway.db_url, "instance_key")[0]["key"].encode()).digest()


def _token_id(gateway: Gateway, name: str = "team-a") -> str:
    token_id: str = next(t["id"] for t in rows(gateway.db_url, "api_token") if t["name"] == name)
    return token_id


def _other_api(gateway: Gateway) -> httpx.Client:
    return gateway.client(create_token(gateway.db_url, "team-b"))


class TestUpload:
    def test_upload_answers_the_replicate_file_object(self, api: httpx.Client, gateway: Gateway) -> None:
        response = _upload(api, metadata=json.dumps({"purpose": "test", "n": 1}))
        assert response.status_code == 201, response.text
        body = response.json()
        assert set(body) == FILE_KEYS
        assert re.fullmatch(r"[a-z2-7]{26}", body["id"])
        assert body["name"] == "photo.png"
        assert body["content_type"] == "image/png"
        assert body["size"] == len(PNG)
        md5 = hashlib.md5(PNG).hexdigest()  # noqa: S324
        assert body["etag"] == f'"{md5}"'
        assert body["checksums"] == {"sha256": hashlib.sha256(PNG).hexdigest(), "md5": md5}
        assert body["metadata"] == {"purpose": "test", "n": 1}
        assert STAMP.match(body["created_at"])
        assert STAMP.match(body["expires_at"])
        created = datetime.fromisoformat(body["created_at"])
        assert datetime.fromisoformat(body["expires_at"]) - created == timedelta(hours=24)
        assert body["urls"] == {"get": f"{gateway.replicate_base}/v1/files/{body['id']}"}
        [stored] = _stored_files(gateway)
        assert stored.read_bytes() == PNG

    def test_npm_style_metadata_file_part(self, api: httpx.Client) -> None:
        response = api.post("/files", files=[
            ("content", ("buffer_1700000000000", PNG, "application/octet-stream")),
            ("metadata", ("blob", b'{"k": "v"}', "application/json")),
        ])
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["metadata"] == {"k": "v"}
        assert body["name"] == "buffer_1700000000000"
        assert body["content_type"] == "application/octet-stream"

    def test_defaults_name_file_metadata_empty_and_type_guessed(self, api: httpx.Client) -> None:
        body = (b"--xyz\r\nContent-Disposition: form-data; name=\"content\"\r\n\r\nhello\r\n--xyz--\r\n")
        response = api.post("/files", content=body,
                            headers={"Content-Type": "multipart/form-data; boundary=xyz"})
        assert response.status_code == 201, response.text
        assert response.json()["name"] == "file"
        assert response.json()["content_type"] == "application/octet-stream"
        assert response.json()["metadata"] == {}
        body = (b"--xyz\r\nContent-Disposition: form-data; name=\"content\"; filename=\"a.json\"\r\n\r\n{}"
                b"\r\n--xyz--\r\n")
        response = api.post("/files", content=body,
                            headers={"Content-Type": "multipart/form-data; boundary=xyz"})
        assert response.json()["content_type"] == "application/json"

    def test_openapi_filename_and_type_fields_win(self, api: httpx.Client) -> None:
        response = _upload(api, filename="renamed.webp", type="image/webp")
        assert response.status_code == 201, response.text
        assert (response.json()["name"], response.json()["content_type"]) == ("renamed.webp", "image/webp")

    @pytest.mark.parametrize("metadata", ["[1, 2]", '"text"', "{not json", "null"])
    def test_metadata_must_be_a_json_object(self, api: httpx.Client, gateway: Gateway, metadata: str) -> None:
        body = assert_problem(_upload(api, metadata=metadata), 422)
        assert body["invalid_fields"][0]["field"] == "metadata"
        assert _stored_files(gateway) == []
        assert rows(gateway.db_url, "stored_file") == []

    def test_missing_content_part_is_422(self, api: httpx.Client, gateway: Gateway) -> None:
        body = assert_problem(api.post("/files", files={"other": ("a.txt", b"x", "text/plain")},
                                       data={"metadata": "{}"}), 422)
        assert body["invalid_fields"] == [
            {"type": "required", "field": "content", "description": "content is required"}
        ]
        assert _stored_files(gateway) == []

    def test_not_multipart_is_415_and_malformed_is_400(self, api: httpx.Client, gateway: Gateway) -> None:
        assert_problem(api.post("/files", json={"content": "x"}), 415)
        truncated = b'--xyz\r\nContent-Disposition: form-data; name="content"\r\n\r\nno end'
        assert_problem(api.post("/files", content=truncated,
                                headers={"Content-Type": "multipart/form-data; boundary=xyz"}), 400)
        assert _stored_files(gateway) == []

    def test_needs_a_token(self, gateway: Gateway) -> None:
        with gateway.client(None) as anonymous:
            assert_problem(_upload(anonymous), 401)
            assert_problem(anonymous.get("/files"), 401)

    def test_an_oversized_upload_is_413_and_nothing_is_kept(self, gateway_factory: Any) -> None:
        gateway: Gateway = gateway_factory(max_file_bytes=1000)
        with gateway.client(create_token(gateway.db_url, "team-a")) as api:
            body = assert_problem(_upload(api, content=b"x" * 5000), 413)
            assert "1000" in body["detail"]
            assert _upload(api, content=b"x" * 1000).status_code == 201
            # Past the file limit plus the body allowance the middleware refuses on the bytes.
            huge = b"x" * (1000 + gateway.settings.max_body_bytes + 10)
            assert_problem(_upload(api, content=huge), 413)

            def chunks() -> Any:
                yield b'--xyz\r\nContent-Disposition: form-data; name="content"; filename="a"\r\n\r\n'
                for _ in range(gateway.settings.max_body_bytes // 65536 + 2):
                    yield b"x" * 65536
                yield b"\r\n--xyz--\r\n"

            assert_problem(api.post("/files", content=chunks(),
                                    headers={"Content-Type": "multipart/form-data; boundary=xyz"}), 413)
        assert len(_stored_files(gateway)) == 1
        assert len(rows(gateway.db_url, "stored_file")) == 1

    def test_uploads_larger_than_the_json_body_limit_are_accepted(
        self, api: httpx.Client, gateway: Gateway
    ) -> None:
        content = bytes(range(256)) * (gateway.settings.max_body_bytes // 256 + 10)
        response = _upload(api, content=content, name="big.bin", content_type="application/octet-stream")
        assert response.status_code == 201, response.text
        assert response.json()["checksums"]["sha256"] == hashlib.sha256(content).hexdigest()


class TestReadAndDelete:
    def test_get_list_delete(self, api: httpx.Client, gateway: Gateway) -> None:
        first = _upload(api, name="one.png").json()
        second = _upload(api, name="two.png").json()
        assert api.get(f"/files/{first['id']}").json() == first
        listed = api.get("/files").json()
        assert listed == {"next": None, "previous": None, "results": [second, first]}
        deleted = api.delete(f"/files/{first['id']}")
        assert deleted.status_code == 204
        assert deleted.content == b""
        assert_problem(api.get(f"/files/{first['id']}"), 404)
        assert_problem(api.delete(f"/files/{first['id']}"), 404)
        assert [f["id"] for f in api.get("/files").json()["results"]] == [second["id"]]
        assert len(_stored_files(gateway)) == 1

    def test_more_than_a_page_is_listed_through_cursors(self, api: httpx.Client, gateway: Gateway) -> None:
        uploaded = [_upload(api, content=bytes([n % 256]) * (n + 1), name=f"f{n}.bin").json()["id"]
                    for n in range(103)]
        first = api.get("/files").json()
        assert first["previous"] is None
        assert first["next"].startswith(f"{gateway.replicate_base}/v1/files?cursor=")
        assert len(first["results"]) == 100
        second = api.get(first["next"]).json()
        assert second["next"] is None
        listed = [f["id"] for f in first["results"]] + [f["id"] for f in second["results"]]
        assert listed == uploaded[::-1]  # newest first, none twice, none missing
        back = api.get(second["previous"]).json()
        assert [f["id"] for f in back["results"]] == [f["id"] for f in first["results"]]
        assert back["previous"] is None
        # A cursor is the token's own: another token's use of it, or a forged one, is refused.
        with _other_api(gateway) as other:
            assert_problem(other.get(first["next"]), 400)
        assert_problem(api.get("/files", params={"cursor": "not-a-cursor"}), 400)

    def test_another_tokens_file_is_exactly_a_missing_one(self, api: httpx.Client, gateway: Gateway) -> None:
        mine = _upload(api).json()
        with _other_api(gateway) as other:
            theirs = other.get(f"/files/{mine['id']}")
            missing = other.get("/files/" + "a" * 26)
            assert_problem(theirs, 404)
            assert theirs.content == missing.content
            assert theirs.json()["detail"] == "File not found"
            assert_problem(other.delete(f"/files/{mine['id']}"), 404)
            assert other.delete(f"/files/{mine['id']}").content == missing.content
            assert other.get("/files").json()["results"] == []
        assert api.get(f"/files/{mine['id']}").status_code == 200

    def test_expired_files_are_not_found_and_purged(self, api: httpx.Client, gateway: Gateway) -> None:
        old = _upload(api, name="old.png").json()
        past = "'2000-01-01 00:00:00.000000'"
        execute(gateway.db_url, f"UPDATE stored_file SET created_at = {past}, expires_at = {past} WHERE id = '{old['id']}'")  # noqa: S608
        assert_problem(api.get(f"/files/{old['id']}"), 404)
        assert api.get("/files").json()["results"] == []
        response = api.post("/models/black-forest-labs/flux-schnell/predictions",
                            json={"input": {"image": old["urls"]["get"]}})
        assert_problem(response, 422)
        new = _upload(api, name="new.png").json()
        assert [r["id"] for r in rows(gateway.db_url, "stored_file")] == [new["id"]]
        assert len(_stored_files(gateway)) == 1


class TestSignedDownload:
    def test_signed_url_serves_the_bytes_without_a_token(self, api: httpx.Client, gateway: Gateway) -> None:
        file = _upload(api, name="notes.txt", content=b"plain text", content_type="text/plain").json()
        key, token_id = _instance_key(gateway), _token_id(gateway)
        url = signed_download_url(gateway.replicate_base, key, token_id, file["id"], 60)
        assert url.startswith(f"{gateway.replicate_base}/v1/files/{file['id']}/download?expiry=")
        response = httpx.get(url)
        assert response.status_code == 200
        assert response.content == b"plain text"
        assert response.headers["content-type"] == "text/plain"
        assert response.headers["content-length"] == str(len(b"plain text"))
        head = httpx.head(url)
        assert (head.status_code, head.content) == (200, b"")
        assert head.headers["content-length"] == str(len(b"plain text"))
        bare = url.replace("/replicate/v1/", "/v1/")
        assert httpx.get(bare).content == b"plain text"

    def test_tampered_expired_or_foreign_signatures_are_404(self, api: httpx.Client, gateway: Gateway) -> None:
        file = _upload(api).json()
        other = _upload(api).json()
        key, token_id = _instance_key(gateway), _token_id(gateway)
        base = f"{gateway.replicate_base}/v1/files/{file['id']}/download"
        good = signed_download_url(gateway.replicate_base, key, token_id, file["id"], 60)
        expiry = int(httpx.URL(good).params["expiry"])
        signature = httpx.URL(good).params["signature"]
        past = int(time.time()) - 1
        tampered = ("A" if signature[0] != "A" else "B") + signature[1:]
        wrong_owner = download_signature(key, _token_id(gateway, "team-a") + "x", file["id"], expiry)
        missing = httpx.get(f"{gateway.replicate_base}/v1/files/{'a' * 26}/download",
                            params={"expiry": expiry, "signature": signature})
        assert_problem(missing, 404)
        for params in (
            {"expiry": expiry, "signature": tampered},
            {"expiry": expiry + 1, "signature": signature},
            {"expiry": past, "signature": download_signature(key, token_id, file["id"], past)},
            {"expiry": expiry, "signature": wrong_owner},
            {"expiry": expiry},
            {},
        ):
            response = httpx.get(base, params=params)
            assert_problem(response, 404)
            assert response.content == missing.content
        # A signature is for one file only.
        response = httpx.get(f"{gateway.replicate_base}/v1/files/{other['id']}/download",
                             params={"expiry": expiry, "signature": signature})
        assert_problem(response, 404)
        assert httpx.get(good).status_code == 200
        api.delete(f"/files/{file['id']}")
        assert_problem(httpx.get(good), 404)


    def test_get_and_head_are_two_operations_of_the_served_openapi_document(self, gateway: Gateway) -> None:
        document = httpx.get(gateway.url + "/openapi.json")
        assert document.status_code == 200
        paths = document.json()["paths"]
        assert {"get", "head"} <= paths["/v1/files/{file_id}/download"].keys()
        operation_ids = [op["operationId"] for path in paths.values() for op in path.values()]
        assert len(operation_ids) == len(set(operation_ids))


@pytest.fixture
def client(gateway: Gateway, token: str) -> replicate.Client:
    return replicate.Client(api_token=token, base_url=gateway.replicate_base)


@pytest.mark.contract
class TestOfficialClient:
    def test_files_create_get_list_delete(self, client: replicate.Client, tmp_path: Path,
                                          gateway: Gateway) -> None:
        path = tmp_path / "cat.png"
        path.write_bytes(PNG)
        created = client.files.create(path, metadata={"who": "cat"})
        assert created.name == "cat.png"
        assert created.content_type == "image/png"
        assert created.size == len(PNG)
        assert created.metadata == {"who": "cat"}
        assert created.urls["get"] == f"{gateway.replicate_base}/v1/files/{created.id}"
        fetched = client.files.get(created.id)
        assert fetched.etag == created.etag
        assert fetched.checksums["sha256"] == hashlib.sha256(PNG).hexdigest()
        with path.open("rb") as handle:
            plain = client.files.create(handle)
        assert plain.metadata == {}
        assert [f.id for f in client.files.list()] == [plain.id, created.id]
        assert client.files.delete(created.id) is True
        with pytest.raises(ReplicateError) as caught:
            client.files.get(created.id)
        assert caught.value.status == 404
        assert [f.id for f in client.files.list()] == [plain.id]

    def test_run_with_a_file_sends_the_upstream_a_data_uri(
        self, client: replicate.Client, relay: FakeRelay, tmp_path: Path, gateway: Gateway
    ) -> None:
        path = tmp_path / "photo.png"
        path.write_bytes(PNG)
        with path.open("rb") as handle:
            output = client.run("black-forest-labs/flux-schnell", input={"image": handle, "prompt": "p"})
        assert len(list(output)) == 1
        [call] = relay.creates()
        image = call.json()["input"]["image"]
        assert image.startswith("data:image/png;base64,")
        assert base64.b64decode(image.partition(",")[2]) == PNG
        assert "/v1/files/" not in call.body.decode()
        assert gateway.url not in call.body.decode()

    def test_with_a_public_url_the_upstream_gets_a_signed_download_url(
        self, gateway_factory: Any, relay: FakeRelay, tmp_path: Path
    ) -> None:
        public = "http://127.0.0.1:1/replicate"
        gateway: Gateway = gateway_factory(public_url=public)
        client = replicate.Client(api_token=create_token(gateway.db_url, "team-a"),
                                  base_url=gateway.replicate_base)
        path = tmp_path / "photo.png"
        path.write_bytes(PNG)
        uploaded = client.files.create(path)
        assert uploaded.urls["get"] == f"{public}/v1/files/{uploaded.id}"
        with path.open("rb") as handle:
            client.run("black-forest-labs/flux-schnell", input={"image": handle})
        [call] = relay.creates()
        image = call.json()["input"]["image"]
        file_id = next(r["id"] for r in rows(gateway.db_url, "stored_file") if r["id"] != uploaded.id)
        assert image.startswith(f"{public}/v1/files/{file_id}/download?")
        response = httpx.get(gateway.url + image.removeprefix("http://127.0.0.1:1"))
        assert response.status_code == 200
        assert response.content == PNG
        assert response.headers["content-type"] == "image/png"


class TestFileInputs:
    def _create(self, api: httpx.Client, **inputs: Any) -> httpx.Response:
        return api.post("/models/black-forest-labs/flux-schnell/predictions", json={"input": inputs})

    def test_another_tokens_or_a_missing_file_is_422_and_nothing_goes_upstream(
        self, api: httpx.Client, gateway: Gateway, relay: FakeRelay
    ) -> None:
        with _other_api(gateway) as other:
            theirs = _upload(other).json()
        mine = _upload(api).json()
        missing = f"{gateway.replicate_base}/v1/files/{'a' * 26}"
        body = assert_problem(self._create(api, image=theirs["urls"]["get"],
                                           images=[mine["urls"]["get"], missing]), 422)
        assert body["invalid_fields"] == [
            {"type": "file", "field": "input.image", "description": "file not found"},
            {"type": "file", "field": "input.images.1", "description": "file not found"},
        ]
        assert relay.creates() == []
        assert rows(gateway.db_url, "prediction") == []

    def test_every_form_of_the_gateways_own_url_is_resolved_and_others_are_untouched(
        self, api: httpx.Client, gateway: Gateway, relay: FakeRelay
    ) -> None:
        file = _upload(api, content=b"tiny", name="t.txt", content_type="text/plain").json()
        bare = f"{gateway.url}/v1/files/{file['id']}"
        foreign = f"https://example.com/v1/files/{file['id']}"
        others = [foreign, file["urls"]["get"] + "/download", file["urls"]["get"] + "?x=1",
                  "data:text/plain;base64,eA==", 7, None]
        response = self._create(api, a=file["urls"]["get"], nested={"list": [bare, {"deep": bare}]},
                                others=others)
        assert response.status_code == 201, response.text
        sent = relay.creates()[0].json()["input"]
        inline = "data:text/plain;base64," + base64.b64encode(b"tiny").decode()
        assert sent["a"] == inline
        assert sent["nested"] == {"list": [inline, {"deep": inline}]}
        assert sent["others"] == others

    def test_files_too_large_to_inline_are_422_without_a_public_url(
        self, api: httpx.Client, relay: FakeRelay
    ) -> None:
        file = _upload(api, content=b"\0" * (10 * 1024 * 1024 + 1), name="big.bin").json()
        body = assert_problem(self._create(api, image=file["urls"]["get"]), 422)
        assert body["invalid_fields"][0]["field"] == "input.image"
        assert "GATEWAY_PUBLIC_URL" in body["detail"]
        assert relay.creates() == []


def test_resolution_walks_deep_inputs_without_recursion_and_never_mutates_them() -> None:
    url = "https://gw.example/replicate/v1/files/" + "b" * 26
    heads = _url_heads("https://gw.example/replicate", None)
    value: dict[str, Any] = {"keep": ["https://gw.example/replicate/v1/files/x/y", url.upper()]}
    node = value
    for _ in range(3000):
        node["next"] = {}
        node = node["next"]
    node["image"] = url
    found = _find_file_urls(value, heads)
    assert found == [(("next",) * 3000 + ("image",), "b" * 26)]
    replaced = _replace(value, [(found[0][0], "data:,x")])
    assert node["image"] == url
    assert replaced["keep"] is value["keep"]
    leaf = replaced
    for _ in range(3000):
        leaf = leaf["next"]
    assert leaf == {"image": "data:,x"}
    assert _url_heads("http://h:1", None) == {"http://h:1", "http://h:1/replicate"}


def test_the_ledger_and_idempotency_see_the_callers_file_url_not_its_resolution(
    api: httpx.Client, relay: FakeRelay
) -> None:
    file_url = _upload(api).json()["urls"]["get"]
    body = {"input": {"image": file_url}}
    path = "/models/black-forest-labs/flux-schnell/predictions"
    first = api.post(path, json=body, headers={"Idempotency-Key": "with-a-file"})
    again = api.post(path, json=body, headers={"Idempotency-Key": "with-a-file"})
    assert first.json()["input"] == {"image": file_url}
    assert again.json()["id"] == first.json()["id"]
    assert len(relay.creates()) == 1
    assert relay.creates()[0].json()["input"]["image"].startswith("data:image/png;base64,")


def test_a_token_with_files_cannot_be_deleted(gateway_factory: Any) -> None:
    gateway: Gateway = gateway_factory(admin_token="admin-secret-123")
    secret = create_token(gateway.db_url, "uploader")
    with gateway.client(secret) as api:
        assert _upload(api).status_code == 201
    with httpx.Client(base_url=gateway.url + "/admin/v1", headers={"Authorization": "Bearer admin-secret-123"}) as admin:
        assert_problem(admin.delete("/tokens/uploader"), 409)
