"""The official replicate Python client, with only base_url changed, against the gateway."""

from __future__ import annotations

import pytest
import replicate
from replicate.exceptions import ModelError, ReplicateError

from tests.conftest import Gateway
from tests.fakes.relay import FakeRelay

pytestmark = pytest.mark.contract

VERSION = "5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa"


@pytest.fixture
def client(gateway: Gateway, token: str) -> replicate.Client:
    return replicate.Client(api_token=token, base_url=gateway.replicate_base)


def _urls(output: list[object]) -> list[str]:
    return [str(item) for item in output]


class TestRun:
    def test_run_model_returns_the_relays_output(self, client: replicate.Client, relay: FakeRelay) -> None:
        output = client.run("black-forest-labs/flux-schnell", input={"prompt": "a cat", "num_outputs": 2})
        urls = _urls(output)
        assert len(urls) == 2
        assert all(u.startswith("https://replicate.delivery/") for u in urls)
        created = relay.creates()
        assert len(created) == 1
        assert created[0].path == "/replicate/v1/models/black-forest-labs/flux-schnell/predictions"

    @pytest.mark.parametrize("prefix", ["/replicate/v1", "/v1"])
    def test_a_base_url_ending_in_v1_works_too(
        self, gateway: Gateway, token: str, relay: FakeRelay, prefix: str
    ) -> None:
        # The Python client 1.x appends /v1 itself: such a base asks for /v1/v1/... (wire spec, rule 1).
        doubled = replicate.Client(api_token=token, base_url=gateway.url + prefix)
        assert len(_urls(doubled.run("black-forest-labs/flux-schnell", input={"prompt": "a cat"}))) == 1
        assert len(doubled.predictions.list().results) == 1
        assert relay.creates()[0].path == "/replicate/v1/models/black-forest-labs/flux-schnell/predictions"

    def test_run_model_with_version_forwards_the_version(
        self, client: replicate.Client, relay: FakeRelay
    ) -> None:
        output = client.run(f"black-forest-labs/flux-dev:{VERSION}", input={"prompt": "a dog"})
        assert len(_urls(output)) == 1
        created = relay.creates()
        assert created[0].path == "/replicate/v1/predictions"
        assert created[0].json()["version"] == VERSION

    def test_run_when_the_relay_ignores_prefer_wait_still_polls_to_the_end(
        self, client: replicate.Client, relay: FakeRelay
    ) -> None:
        relay.honour_prefer = False
        output = client.run("black-forest-labs/flux-schnell", input={"prompt": "slow"})
        assert len(_urls(output)) == 1

    def test_failed_prediction_raises_model_error(self, client: replicate.Client) -> None:
        with pytest.raises(ModelError):
            client.run("black-forest-labs/flux-schnell", input={"prompt": "x", "fail": True})


class TestPredictions:
    def test_create_wait_reload(self, client: replicate.Client, gateway: Gateway) -> None:
        prediction = client.predictions.create(
            model="black-forest-labs/flux-schnell", input={"prompt": "a fox"}
        )
        assert prediction.status == "starting"
        assert prediction.urls["get"] == f"{gateway.replicate_base}/v1/predictions/{prediction.id}"
        prediction.wait()
        assert prediction.status == "succeeded"
        assert prediction.metrics["predict_time"] == pytest.approx(2.5)
        prediction.reload()
        assert prediction.status == "succeeded"
        assert len(prediction.output) == 1
        fetched = client.predictions.get(prediction.id)
        assert fetched.output == prediction.output

    def test_cancel(self, client: replicate.Client, relay: FakeRelay) -> None:
        relay.starting_seconds = 30
        prediction = client.predictions.create(
            model="black-forest-labs/flux-schnell", input={"prompt": "never mind"}
        )
        prediction.cancel()
        assert prediction.status == "canceled"
        assert client.predictions.get(prediction.id).status == "canceled"
        assert any(call.path.endswith("/cancel") for call in relay.calls)

    def test_list_pages_through_more_than_a_hundred(
        self, client: replicate.Client, gateway: Gateway
    ) -> None:
        created = {
            client.predictions.create(model="black-forest-labs/flux-schnell", input={"prompt": str(i)}).id
            for i in range(105)
        }
        first = client.predictions.list()
        assert len(first.results) == 100
        assert first.next is not None
        assert first.next.startswith(gateway.replicate_base + "/v1/predictions?cursor=")
        seen = [p.id for page in replicate.paginate(client.predictions.list) for p in page]
        assert len(seen) == len(set(seen)) == 105
        assert set(seen) == created
        second = client.predictions.list(first.next)
        assert len(second.results) == 5
        assert second.previous is not None
        back = client.predictions.list(second.previous)
        assert [p.id for p in back.results] == [p.id for p in first.results]

    def test_unknown_prediction_raises_404(self, client: replicate.Client) -> None:
        with pytest.raises(ReplicateError) as caught:
            client.predictions.get("doesnotexist")
        assert caught.value.status == 404

    def test_account_is_the_token_not_the_upstream(self, client: replicate.Client) -> None:
        account = client.accounts.current()
        assert account.username == "team-a"
