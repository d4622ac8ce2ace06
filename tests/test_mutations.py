"""The tests have teeth: each guard, taken out of a copy of the project, turns its catchers red.

Each row of MUTATIONS names a guard, the promise or invariant it keeps (P1..P16, I1..I8), the one
place in the source that is the guard and what it becomes without it, and the fewest tests that
must then fail. The copy runs those tests in a pytest of its own, on SQLite, as a clean checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Neither is imported by a test; the npm client's packages are installed on first use, outside git.
NOT_COPIED = ("bench/", "tests/js/node_modules/")
# 1 is "tests failed"; 2 to 5 (interrupted, internal error, usage error, nothing collected) mean
# the catchers never ran as tests, which proves nothing about the guard.
TESTS_FAILED = 1


@dataclass(frozen=True)
class Mutation:
    """One guard taken out: `original` (found exactly once in `path`) becomes `replacement`."""

    name: str
    path: str
    original: str
    replacement: str
    guarantee: str
    catchers: tuple[str, ...]


MUTATIONS = (
    Mutation(
        name="sqlite-writes-begin-deferred",
        path="app/db.py",
        original='connection.exec_driver_sql("BEGIN IMMEDIATE")',
        replacement='connection.exec_driver_sql("BEGIN")',
        guarantee="P15",
        catchers=("tests/test_sqlite_inline.py::test_a_session_that_reads_then_writes_waits_out_a_write_lock_held_elsewhere",),
    ),
    Mutation(
        name="sqlite-group-commit-begins-deferred",
        path="app/db.py",
        original='dbapi_connection.execute("BEGIN IMMEDIATE")',
        replacement='dbapi_connection.execute("BEGIN")',
        guarantee="P15",
        catchers=("tests/test_sqlite_inline.py::test_a_write_lock_held_elsewhere_delays_creates_but_never_the_event_loop",),
    ),
    Mutation(
        name="body-bytes-not-counted",
        path="app/middleware.py",
        original="if received > limit:",
        replacement="if False:",
        guarantee="P13",
        catchers=("tests/predictions/test_router.py::TestRequestValidation::"
                  "test_oversized_body_is_413_before_reaching_the_upstream",),
    ),
    Mutation(
        name="outbound-redirects-followed",
        path="app/outbound.py",
        original="follow_redirects=False,",
        replacement="follow_redirects=True,",
        guarantee="P12",
        catchers=("tests/webhooks/test_delivery.py::test_a_redirect_is_not_followed",),
    ),
    Mutation(
        name="caller-token-not-checked",
        path="app/deps.py",
        original="return Caller(token=token_service.ensure_live(token), secret=secret)",
        replacement="return Caller(token=token, secret=secret)",
        guarantee="P10",
        catchers=("tests/test_route_inventory.py::test_authenticated_routes_refuse_every_other_credential",),
    ),
    Mutation(
        name="ledger-entries-not-unique",
        path="migrations/versions/2026-11-21-0619_ledger_budgets_reconciler.py",
        original=""",
    sa.UniqueConstraint('prediction_id', 'kind', name=op.f('uq_ledger_entry_prediction_id_kind'))""",
        replacement="",
        guarantee="P2, I1",
        catchers=("tests/accounting/test_settlement.py::test_the_database_refuses_a_second_closing_entry_for_a_prediction",),
    ),
    Mutation(
        name="router-without-its-auth-dependency",
        path="app/predictions/router.py",
        original="router = APIRouter(dependencies=[Depends(require_caller)])",
        replacement="router = APIRouter()",
        guarantee="P10",
        catchers=("tests/test_route_inventory.py::test_each_router_decides_access_in_one_place",),
    ),
    Mutation(
        name="terminal-status-overwritten",
        path="app/predictions/recording.py",
        original='**dict.fromkeys(TERMINAL_STATUSES, ("starting", "processing")),',
        replacement='**dict.fromkeys(TERMINAL_STATUSES, ("starting", "processing", *TERMINAL_STATUSES)),',
        guarantee="P5, I6",
        catchers=("tests/accounting/test_settlement.py::test_two_processes_recording_the_same_final_state_close_it_once",),
    ),
    Mutation(
        name="link-not-one-to-one",
        path="app/predictions/recording.py",
        original="condition += [columns.submission == Submission.PENDING, columns.upstream_id.is_(None)]",
        replacement="condition += []",
        guarantee="P1, I4",
        catchers=("tests/test_direct_statements.py::test_writes_and_reads_store_and_return_what_core_does",),
    ),
    Mutation(
        name="budget-not-checked-at-admission",
        path="app/accounting/service.py",
        original="""        or_(
            tokens.budget_micros.is_(None),""",
        replacement="""        or_(
            tokens.budget_micros.is_(None), tokens.id.is_not(None),""",
        guarantee="P3",
        # Only the two `python -m app serve` processes admit these creates: caught only if the
        # processes a test starts run the copy's code.
        catchers=("tests/jobs/test_two_processes.py::test_budget_rate_and_settlement_hold_across_two_processes",),
    ),
    Mutation(
        name="idempotency-key-not-stored",
        path="app/predictions/service.py",
        original='"idempotency_key": idempotency_key,',
        replacement='"idempotency_key": None,',
        guarantee="P6",
        catchers=("tests/predictions/test_idempotency.py::test_same_key_and_body_return_the_same_prediction",),
    ),
    Mutation(
        name="inbound-webhook-token-not-checked",
        path="app/webhooks/inbound.py",
        original="if not hmac.compare_digest(token.encode(), inbound_token(key, prediction_id).encode()):",
        replacement="if False:",
        guarantee="P9",
        catchers=("tests/webhooks/test_inbound.py::test_a_wrong_token_or_unknown_id_is_404_and_changes_nothing",),
    ),
    Mutation(
        name="webhook-to-private-address",
        path="app/webhooks/guard.py",
        original="if not allow_private and not all(is_public(a) for a in addresses):",
        replacement="if False:",
        guarantee="P12",
        catchers=("tests/webhooks/test_guard.py::test_private_literal_addresses_are_refused",),
    ),
    Mutation(
        name="logs-not-scrubbed",
        path="app/logging.py",
        original="record.msg = self.scrub(record.getMessage())",
        replacement="record.msg = record.getMessage()",
        guarantee="P11, I5",
        catchers=("tests/test_logging.py::TestThroughAHandler::test_in_the_message",),
    ),
)


def _project_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, check=True, capture_output=True, text=True).stdout.splitlines()
    return [name for name in listed if not name.startswith(NOT_COPIED) and (ROOT / name).is_file()]


def _copy_project(destination: Path) -> Path:
    for name in _project_files():
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    return destination


def _run_tests(project: Path, node_ids: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    # SQLite only, and no setting of the caller's: the copy is judged as a clean checkout.
    environment = {name: value for name, value in os.environ.items() if not name.startswith("GATEWAY_")}
    # Its own temporary root: pytest prunes old runs in the shared one, this session's among them.
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         f"--basetemp={project.parent / 'basetemp'}", *node_ids],
        cwd=project, env=environment, capture_output=True, text=True, timeout=300, check=False)


def _tail(result: subprocess.CompletedProcess[str]) -> str:
    return "\n".join((result.stdout + result.stderr).splitlines()[-40:])


def test_the_catchers_pass_on_the_unmutated_project(tmp_path: Path) -> None:
    catchers = tuple(dict.fromkeys(node for mutation in MUTATIONS for node in mutation.catchers))
    result = _run_tests(_copy_project(tmp_path / "project"), catchers)
    assert result.returncode == 0, _tail(result)
    # A catcher skipped here (one for PostgreSQL only, say) would catch nothing when mutated.
    assert " skipped" not in result.stdout, _tail(result)


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[mutation.name for mutation in MUTATIONS])
def test_removing_the_guard_turns_its_catchers_red(mutation: Mutation, tmp_path: Path) -> None:
    source = (ROOT / mutation.path).read_text()
    assert source.count(mutation.original) == 1, (
        f"the mutation table is out of date: {mutation.name}'s snippet occurs {source.count(mutation.original)} "
        f"times in {mutation.path}, not once")
    project = _copy_project(tmp_path / "project")
    (project / mutation.path).write_text(source.replace(mutation.original, mutation.replacement))
    result = _run_tests(project, mutation.catchers)
    assert result.returncode == TESTS_FAILED, (
        f"{mutation.name} ({mutation.guarantee}) was not caught by {', '.join(mutation.catchers)}: "
        f"pytest exited {result.returncode}\n{_tail(result)}")
