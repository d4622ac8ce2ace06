"""The `groups` command and `tokens --group`: the same checks as the admin API, from the shell."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson

from tests.dbtools import rows
from tests.helpers import cli


def test_create_list_update_and_delete(db_url: str) -> None:
    created = cli(db_url, "groups", "create", "resellers", "--models", "black-forest-labs/*", "meta/*",
                  "--upstreams", "default", "--price-multiplier", "1.25", "--json")
    assert created.returncode == 0, created.stderr
    view = orjson.loads(created.stdout)
    assert (view["name"], view["models"], view["upstreams"]) == ("resellers", ["black-forest-labs/*", "meta/*"],
                                                                  ["default"])
    assert view["price_multiplier"] == "1.250000"
    assert cli(db_url, "groups", "create", "plain").returncode == 0

    listed = orjson.loads(cli(db_url, "groups", "list", "--json").stdout)
    assert [(g["name"], g["price_multiplier"], g["tokens"]) for g in listed] == [
        ("plain", "1.000000", 0), ("resellers", "1.250000", 0)]
    table = cli(db_url, "groups", "list").stdout
    assert "resellers" in table
    assert "1.250000" in table

    token = cli(db_url, "tokens", "create", "member", "--group", "resellers", "--json")
    assert token.returncode == 0, token.stderr
    assert orjson.loads(cli(db_url, "tokens", "list", "--json").stdout)[0]["group"] == "resellers"
    assert orjson.loads(cli(db_url, "groups", "list", "--json").stdout)[1]["tokens"] == 1

    in_use = cli(db_url, "groups", "delete", "resellers")
    assert in_use.returncode == 2
    assert "move them" in in_use.stderr

    changed = cli(db_url, "groups", "update", "resellers", "--price-multiplier", "2", "--all-models",
                  "--name", "partners", "--json")
    assert changed.returncode == 0, changed.stderr
    assert orjson.loads(changed.stdout)["price_multiplier"] == "2.000000"
    assert orjson.loads(changed.stdout)["models"] is None
    assert orjson.loads(changed.stdout)["upstreams"] == ["default"]
    moved = cli(db_url, "tokens", "update", "member", "--group", "plain", "--json")
    assert orjson.loads(moved.stdout)["group"] == "plain"
    cleared = cli(db_url, "tokens", "update", "member", "--group", "none", "--json")
    assert orjson.loads(cleared.stdout)["group"] is None

    deleted = cli(db_url, "groups", "delete", "partners")
    assert deleted.returncode == 0, deleted.stderr
    assert sorted(g["name"] for g in rows(db_url, "token_group")) == ["plain"]


def test_bad_arguments_fail_cleanly_and_change_nothing(db_url: str) -> None:
    for args in (
        ["groups", "create", "g", "--price-multiplier", "0"],
        ["groups", "create", "g", "--price-multiplier", "1.0000001"],
        ["groups", "create", "g", "--price-multiplier", "101"],
        ["groups", "create", "g", "--upstreams", "nowhere"],
        ["groups", "create", "bad name!"],
        ["groups", "update", "nobody", "--all-models"],
        ["groups", "delete", "nobody"],
        ["tokens", "create", "t", "--group", "nobody"],
        ["groups", "update", "g", "--models", "a/*", "--all-models"],
    ):
        result = cli(db_url, *args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
    assert rows(db_url, "token_group") == []
    assert rows(db_url, "api_token") == []
    assert "'nowhere'" in cli(db_url, "groups", "create", "g", "--upstreams", "nowhere").stderr
    assert cli(db_url, "groups", "create", "g").returncode == 0
    assert cli(db_url, "groups", "create", "g").returncode == 2


def test_upstream_names_come_from_the_configured_upstreams(db_url: str, tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[[upstreams]]\nname = "relay-a"\nurl = "http://127.0.0.1:9/replicate"\n'
                      '[[upstreams]]\nname = "relay-b"\nurl = "http://127.0.0.1:9/replicate"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(GATEWAY_DATABASE_URL=db_url, GATEWAY_CONFIG=str(config))

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "app", *args], env=env, capture_output=True, text=True,
                              timeout=60, check=False)

    assert run("groups", "create", "a-only", "--upstreams", "relay-a").returncode == 0
    refused = run("groups", "create", "old", "--upstreams", "default")
    assert refused.returncode == 2
    assert "relay-a, relay-b" in refused.stderr
    assert run("groups", "update", "a-only", "--upstreams", "relay-b", "relay-c").returncode == 2
    changed = run("groups", "update", "a-only", "--upstreams", "relay-b", "relay-a", "--json")
    assert orjson.loads(changed.stdout)["upstreams"] == ["relay-b", "relay-a"]
