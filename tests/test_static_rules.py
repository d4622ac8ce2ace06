"""Static rules over the source: secrets compared in constant time, no redirects, no SQL from strings."""

from __future__ import annotations

import ast
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "app"

# Names of values that are secrets or are checked against one (a caller's credential, a signature,
# a capability, a keyed digest): an `==` on them answers sooner the earlier they differ.
SECRET_NAME = re.compile(
    r"(secret|signature|password|capability|digest|token|token_hash|presented|_mac|^mac|^expected)$", re.I)

# Each exception names the place (file, and the statement as `ast.unparse` prints it) and why it
# is safe; a new match anywhere else fails.
SQL_COMPARISONS = {
    # SQL, not Python: the row is found by the keyed hash, as any index lookup is.
    ("app/tokens/service.py", "ApiToken.token_hash == digest"),
    ("app/outputs/archiver.py",
     "OutputFile.source_url_sha256 == hashlib.sha256(source.encode()).hexdigest()"),
}
SQL_FROM_CONSTANTS = {
    # The pragmas are the module's own constant tuple; the column names the model's own.
    ("app/db.py", "cursor.execute(f'PRAGMA {pragma}')"),
    ("app/predictions/models.py", "text(f'{columns[-1]} IS NOT NULL')"),
    ("migrations/env.py", "cursor.execute(f'PRAGMA {pragma}')"),
    ("migrations/env.py", "connection.exec_driver_sql(f'SELECT pg_advisory_xact_lock({MIGRATION_LOCK_ID})')"),
    ("migrations/versions/2026-11-21-0847_dashboard_indexes_and_daily_usage.py",
     "op.execute(BACKFILL.format(day=\"(created_at AT TIME ZONE 'UTC')::date\" if postgres else 'date(created_at)'))"),
    ("migrations/versions/2026-12-02-0600_partial_prediction_indexes.py", "sa.text(f'{columns[-1]} IS NOT NULL')"),
}
OWN_EXCEPTION_TEXT = {
    # The parser's own exception, whose messages are its own fixed sentences.
    ("app/files/router.py", "BadRequest(f'The multipart/form-data body is malformed: {exc}')"),
    # The command line's, to the operator typing it: parse_multiplier's own sentence.
    ("app/cli.py", "argparse.ArgumentTypeError(f'not a price multiplier ({exc}): {value}')"),
}
MUTABLE_CONTAINERS = frozenset({"list", "dict", "set", "deque", "Queue", "defaultdict", "OrderedDict", "Counter",
                                "WeakSet", "WeakValueDictionary", "WeakKeyDictionary"})
MUTATIONS = frozenset({"append", "extend", "put", "put_nowait", "add", "update", "setdefault", "appendleft",
                       "insert", "pop", "popleft", "popitem", "clear", "remove", "discard"})
SQL_CALLS = frozenset({"text", "exec_driver_sql", "execute", "executemany", "executescript", "fetch",
                       "fetchrow", "fetchval", "prepare", "literal_column"})
LOG_METHODS = frozenset({"debug", "info", "warning", "error", "exception", "critical"})
# Parts of a request or an upstream exchange that carry credentials or signed queries.
LOGGED_NEVER = frozenset({"headers", "query_params", "cookies", "query_string", "query"})
RESPONSE_CALLS = re.compile(r"(Error|Problem|Response|Invalid|Refused|Unavailable|Timeout|TooLarge|NotFound|"
                            r"Request|Conflict|Forbidden|Unauthenticated)$")
# Credentials as issued: Replicate tokens, webhook secrets, private keys, cloud and forge keys.
CREDENTIAL = re.compile(r"r8_[A-Za-z0-9]{30,}|whsec_[A-Za-z0-9+/=]{20,}|-----BEGIN [A-Z ]*PRIVATE KEY-----|"
                        r"AKIA[0-9A-Z]{16}|sk-[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{30,}")
# Standard Webhooks' published example secret, used to check our signatures against theirs.
PUBLISHED_EXAMPLES = frozenset({"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"})


def _sources(*roots: str) -> Iterator[tuple[str, ast.Module]]:
    for root in roots:
        for path in sorted((ROOT / root).rglob("*.py")):
            yield str(path.relative_to(ROOT)), ast.parse(path.read_text(), filename=str(path))


def _name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Call):
        return _name(node.func)
    return None


def _exception_names(tree: ast.AST) -> set[str]:
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.ExceptHandler) and node.name}


def _shows_exception_text(node: ast.AST, exceptions: set[str]) -> bool:
    """Whether `node` puts an exception's own text into a string: str(exc), repr(exc), f"{exc}"."""
    for part in ast.walk(node):
        if (isinstance(part, ast.Call) and _name(part.func) in ("str", "repr", "format") and part.args
                and isinstance(part.args[0], ast.Name) and part.args[0].id in exceptions):
            return True
        if isinstance(part, ast.FormattedValue) and isinstance(part.value, ast.Name) and part.value.id in exceptions:
            return True
        if isinstance(part, ast.Attribute) and part.attr == "args" and _name(part.value) in exceptions:
            return True
    return False


def test_secrets_are_compared_in_constant_time() -> None:
    found = set()
    for path, tree in _sources("app"):
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and any(isinstance(op, ast.Eq | ast.NotEq) for op in node.ops):
                names = [_name(side) for side in (node.left, *node.comparators)]
                if any(name and SECRET_NAME.search(name) for name in names):
                    found.add((path, ast.unparse(node)))
    assert found - SQL_COMPARISONS == set(), "compare secrets with hmac.compare_digest"
    assert found >= SQL_COMPARISONS, "an exception no longer needed: remove it from SQL_COMPARISONS"


def test_no_client_follows_redirects() -> None:
    for path, tree in _sources("app"):
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg in ("follow_redirects", "allow_redirects"):
                assert isinstance(node.value, ast.Constant), (path, node.lineno)
                assert node.value.value is False, (path, node.lineno)


def test_sql_is_never_built_from_strings() -> None:
    found = set()
    for path, tree in _sources("app", "migrations"):
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _name(node.func) in SQL_CALLS and node.args:
                sql = node.args[0]
                if (isinstance(sql, ast.JoinedStr)
                        or (isinstance(sql, ast.BinOp) and isinstance(sql.op, ast.Mod | ast.Add))
                        or (isinstance(sql, ast.Call) and _name(sql.func) == "format")):
                    found.add((path, ast.unparse(node)))
    assert found - SQL_FROM_CONSTANTS == set(), "bind values as parameters; never format them into SQL"
    assert found >= SQL_FROM_CONSTANTS, "an exception no longer needed: remove it from SQL_FROM_CONSTANTS"


def test_an_exceptions_own_text_never_reaches_a_caller() -> None:
    # Another library's message may carry an upstream URL, a host, a query or a secret: callers get
    # the gateway's own sentences. Logs may carry it (they are scrubbed), answers may not.
    found = set()
    for path, tree in _sources("app"):
        exceptions = _exception_names(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and RESPONSE_CALLS.search(_name(node.func) or "")
                    and _shows_exception_text(node, exceptions)):
                found.add((path, ast.unparse(node)))
    assert found - OWN_EXCEPTION_TEXT == set()
    assert found >= OWN_EXCEPTION_TEXT, "an exception no longer needed: remove it from OWN_EXCEPTION_TEXT"


def test_logs_never_get_headers_queries_or_cookies() -> None:
    found = []
    for path, tree in _sources("app"):
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in LOG_METHODS and _name(node.func.value) in ("log", "logger", "logging")):
                continue
            for part in ast.walk(node):
                if isinstance(part, ast.Attribute) and part.attr in LOGGED_NEVER:
                    found.append((path, node.lineno, ast.unparse(part)))
                # A URL is logged by its path alone: its query may be signed (downloads, cursors).
                if isinstance(part, ast.Attribute) and part.attr == "url" and not _only_its_path(node, part):
                    found.append((path, node.lineno, ast.unparse(part)))
    assert found == []


def _only_its_path(call: ast.Call, url: ast.Attribute) -> bool:
    return any(isinstance(part, ast.Attribute) and part.attr == "path" and part.value is url for part in ast.walk(call))


def test_no_credential_is_committed() -> None:
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    found = []
    for name in filter(None, tracked.decode().split("\0")):
        path = ROOT / name
        if not path.is_file() or path.suffix in (".png", ".ico", ".woff2"):
            continue
        for match in CREDENTIAL.finditer(path.read_text(errors="replace")):
            if match.group() not in PUBLISHED_EXAMPLES:
                found.append((name, match.group()[:12] + "..."))
    assert found == []


def test_no_module_keeps_money_or_delivery_state() -> None:
    # Spend, reservations and deliveries live in the database only (P4): a module-level queue or
    # buffer would lose them with the process. A module may hold tables of constants, named in
    # capitals, and changes none of its own containers.
    found = []
    for path, tree in _sources("app/accounting", "app/webhooks", "app/predictions", "app/jobs"):
        module_names = set()
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
            for target in targets:
                if not isinstance(target, ast.Name):
                    continue
                module_names.add(target.id)
                if _is_mutable(node.value) and not target.id.lstrip("_").isupper():
                    found.append((path, node.lineno, target.id))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in module_names
                    and node.func.attr in MUTATIONS):
                found.append((path, node.lineno, ast.unparse(node)))
            if (isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store | ast.Del)
                    and isinstance(node.value, ast.Name) and node.value.id in module_names):
                found.append((path, node.lineno, ast.unparse(node)))
    assert found == [], "keep money and delivery state in the database, not in a module"


def _is_mutable(value: ast.expr | None) -> bool:
    return isinstance(value, ast.List | ast.Dict | ast.Set | ast.ListComp | ast.DictComp | ast.SetComp) or (
        isinstance(value, ast.Call) and _name(value.func) in MUTABLE_CONTAINERS)
