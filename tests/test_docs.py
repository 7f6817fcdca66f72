"""The docs stay true to the code (after datasette's "every permission is documented" test).

- Every gap cause, rejection code and alarm code the code defines is documented, in backticks, in
  docs/design/states.md; rejection codes also in docs/protocol.md, alarm codes also in docs/operations.md.
  The codes are collected from the code itself, from whatever form they take (tuples of strings, module
  constants, str enums), so the test holds while those definitions move.
- The code tables of docs/design/states.md name only codes that exist, and mark exactly the retryable
  rejection codes as retried.
- Every relative link in README.md and docs/**/*.md points at an existing file (and heading) inside the
  repository; nothing links outside it.
"""

from __future__ import annotations

import ast
import enum
import importlib
import pkgutil
import re
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
STATES = DOCS / "design" / "states.md"
PROTOCOL = DOCS / "protocol.md"
OPERATIONS = DOCS / "operations.md"

CODE_RE = re.compile(r"[a-z][a-z0-9_]*")


# ---------------------------------------------------------------------------- collecting codes from the code

def _text(value: object) -> str | None:
    """The plain string of a code: a str, or a (str) enum member's value; None for anything else."""
    value = getattr(value, "value", value)
    return value if isinstance(value, str) and CODE_RE.fullmatch(value) else None


def _texts(values: Iterable[object]) -> set[str]:
    return {text for value in values if (text := _text(value)) is not None}


def _enums(module: ModuleType, *words: str) -> set[str]:
    """Members of the Enum classes defined in `module` whose name contains one of `words`."""
    found: set[str] = set()
    for name, obj in vars(module).items():
        if (isinstance(obj, type) and issubclass(obj, enum.Enum) and obj.__module__ == module.__name__
                and any(word in name for word in words)):
            found |= _texts(obj)
    return found


def _contract_enums(*words: str) -> set[str]:
    """Members of such enums anywhere in exam_contract (e.g. exam_contract.alarms.AlarmCode)."""
    import exam_contract

    found: set[str] = set()
    for info in pkgutil.iter_modules(exam_contract.__path__):
        found |= _enums(importlib.import_module(f"exam_contract.{info.name}"), *words)
    return found


def _constants(module: ModuleType, prefix: str) -> set[str]:
    return _texts(obj for name, obj in vars(module).items() if name.startswith(prefix))


def _resolve(module: ModuleType, node: ast.expr) -> str | None:
    """The code an expression in `module` stands for: a string literal, or a name or attribute chain that
    resolves (in the imported module) to a string or a str enum member."""
    if isinstance(node, ast.Constant):
        return _text(node.value)
    chain: list[str] = []
    while isinstance(node, ast.Attribute):
        chain.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id == "self":
        return None
    obj: object = vars(module).get(node.id)
    for attr in reversed(chain):
        obj = getattr(obj, attr, None)
    return _text(obj) if obj is not None else None


def _call_name(node: ast.Call) -> str:
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def _alarms_in_package(package: str) -> set[str]:
    """Alarm codes a package's modules use: `ALARM_*` constants, and the first argument of every call of a
    function named `*alarm` (`_alarm(...)`, `on_alarm(...)`, `raise_alarm(...)`) that resolves to a code."""
    found: set[str] = set()
    for path in sorted((ROOT / package).glob("*.py")):
        source = path.read_text(encoding="utf-8")
        if "alarm" not in source.lower():
            continue
        module = importlib.import_module(f"{package}.{path.stem}")
        found |= _constants(module, "ALARM_")
        for node in ast.walk(ast.parse(source)):
            if (isinstance(node, ast.Call) and node.args and _call_name(node).lower().endswith("alarm")
                    and (code := _resolve(module, node.args[0])) is not None):
                found.add(code)
    return found


def _returns_of(module: ModuleType, function: str) -> set[str]:
    """The codes a module-level function returns (e.g. `collector.ingest_alarms.classify`)."""
    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == function:
            for ret in ast.walk(node):
                if (isinstance(ret, ast.Return) and ret.value is not None
                        and (code := _resolve(module, ret.value)) is not None):
                    found.add(code)
    return found


def gap_causes() -> set[str]:
    """Causes an agent states (`exam_contract.manifest`) and causes the collector derives (`collector.coverage`)."""
    from collector import coverage
    from exam_contract import manifest

    causes = _texts(getattr(manifest, "GAP_CAUSES", ())) | _contract_enums("Cause")
    causes |= _constants(coverage, "CAUSE_") | _enums(coverage, "Cause")
    prefix = _text(getattr(coverage, "HEALTH_PREFIX", "health_")) or "health_"
    causes |= {prefix + flag for flag in _texts(getattr(coverage, "DISQUALIFYING_HEALTH", ()))}
    return causes


def rejection_codes() -> set[str]:
    from exam_contract import protocol

    return (_texts(getattr(protocol, "REJECTION_CODES", ())) | _constants(protocol, "REJECT_")
            | _contract_enums("Reject"))


def retryable_rejections() -> set[str]:
    from exam_contract import protocol

    return _texts(getattr(protocol, "RETRYABLE_REJECTIONS", ()))


def collector_alarms() -> set[str]:
    from collector import ingest_alarms

    codes = _texts(getattr(ingest_alarms, "ADVICE", {}))
    codes |= _texts(obj for name, obj in vars(ingest_alarms).items()
                    if name.isupper() and not name.startswith(("EVENT_", "_")) and _text(obj) is not None
                    and isinstance(obj, (str, enum.Enum)) and name != "ADVICE")
    codes |= _enums(ingest_alarms, "Alarm") | _returns_of(ingest_alarms, "classify")
    return codes | _alarms_in_package("collector")


def agent_alarms() -> set[str]:
    return _alarms_in_package("edge_agent")


def alarm_codes() -> set[str]:
    return _contract_enums("Alarm") | collector_alarms() | agent_alarms()


def recorder_states() -> set[str]:
    from edge_agent.recorder import RecorderState

    return _texts(RecorderState)


def reply_states() -> set[str]:
    from exam_contract import protocol

    return _texts(getattr(protocol, "REPLY_STATES", ())) | _enums(protocol, "ReplyState")


def coverage_statuses() -> set[str]:
    from collector import coverage

    return _constants(coverage, "STATUS_")


# ---------------------------------------------------------------------------- reading the docs

def _strip_fences(text: str) -> str:
    """The text without fenced code blocks (their lines become empty)."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            out.append("")
            continue
        out.append("" if fenced else line)
    return "\n".join(out)


def backticked(path: Path) -> set[str]:
    """Everything written in backticks in a Markdown file."""
    return set(re.findall(r"`([^`\n]+)`", path.read_text(encoding="utf-8")))


def table_under(path: Path, heading: str) -> list[list[str]]:
    """The rows (cells, stripped) of the first table after `heading`, header and separator left out."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("#") and line.strip("# ").strip() == heading),
                 None)
    assert start is not None, f"no heading '{heading}' in {path.relative_to(ROOT)}"
    rows: list[list[str]] = []
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            break
    return rows[2:]


def codes_in_first_column(rows: list[list[str]]) -> set[str]:
    return {code for row in rows for code in re.findall(r"`([^`]+)`", row[0])}


# ---------------------------------------------------------------------------- every code is documented

GAP_CAUSES = sorted(gap_causes())
REJECTION_CODES = sorted(rejection_codes())
ALARM_CODES = sorted(alarm_codes())


def test_codes_were_found_in_the_code():
    """The collectors find the codes at all (an empty list would make every test below pass vacuously)."""
    from exam_contract import manifest

    assert set(_texts(getattr(manifest, "GAP_CAUSES", ()))) <= set(GAP_CAUSES)
    assert len(GAP_CAUSES) >= 10, GAP_CAUSES
    assert any(c.startswith("health_") for c in GAP_CAUSES), GAP_CAUSES
    assert len(REJECTION_CODES) >= 15, REJECTION_CODES
    assert retryable_rejections() and retryable_rejections() <= set(REJECTION_CODES)
    assert agent_alarms(), "no alarm code found in edge_agent/"
    assert collector_alarms(), "no alarm code found in collector/"


@pytest.mark.parametrize("cause", GAP_CAUSES)
def test_gap_cause_is_documented(cause: str):
    assert cause in backticked(STATES), f"gap cause `{cause}` is not documented in {STATES.relative_to(ROOT)}"


@pytest.mark.parametrize("code", REJECTION_CODES)
def test_rejection_code_is_documented(code: str):
    for doc in (STATES, PROTOCOL):
        assert code in backticked(doc), f"rejection code `{code}` is not documented in {doc.relative_to(ROOT)}"


@pytest.mark.parametrize("code", ALARM_CODES)
def test_alarm_code_is_documented(code: str):
    for doc in (STATES, OPERATIONS):
        assert code in backticked(doc), f"alarm code `{code}` is not documented in {doc.relative_to(ROOT)}"


@pytest.mark.parametrize("heading, collect", [("Gap causes", gap_causes), ("Rejection codes", rejection_codes),
                                              ("Alarm codes", alarm_codes)])
def test_code_tables_name_only_codes_that_exist(heading: str, collect):
    documented = codes_in_first_column(table_under(STATES, heading))
    assert documented, f"no table under '{heading}' in {STATES.relative_to(ROOT)}"
    assert documented == collect(), f"'{heading}': documented but not in the code: {documented - collect()}; " \
                                    f"in the code but not in the table: {collect() - documented}"


def test_retryable_rejections_are_marked_as_such():
    rows = table_under(STATES, "Rejection codes")
    marked = {code for row in rows if row[-1].lower().startswith("yes") for code in re.findall(r"`([^`]+)`", row[0])}
    assert marked == retryable_rejections()


@pytest.mark.parametrize("name, collect", [("recorder state", recorder_states), ("reply state", reply_states),
                                           ("coverage status", coverage_statuses)])
def test_states_are_documented(name: str, collect):
    states = collect()
    assert states, f"no {name} found in the code"
    missing = states - backticked(STATES)
    assert not missing, f"{name}(s) not documented in {STATES.relative_to(ROOT)}: {sorted(missing)}"


# ---------------------------------------------------------------------------- the design pages

DESIGN_PAGES = sorted(p for p in (DOCS / "design").glob("*.md") if p.name != "README.md")
DESIGN_SECTIONS = ["Status", "Objective", "Assumptions", "Detailed design", "Caveats and non-goals"]


@pytest.mark.parametrize("page", DESIGN_PAGES, ids=lambda p: p.name)
def test_design_page_has_the_sections_in_order(page: Path):
    headings = re.findall(r"^## (.+?)\s*$", _strip_fences(page.read_text(encoding="utf-8")), flags=re.MULTILINE)
    assert headings == DESIGN_SECTIONS, f"{page.relative_to(ROOT)}: sections {headings}"


def test_every_design_page_is_in_the_index():
    index = (DOCS / "design" / "README.md").read_text(encoding="utf-8")
    assert DESIGN_PAGES and all(f"]({page.name})" in index for page in DESIGN_PAGES)


def test_code_points_only_at_docs_that_exist():
    """Module docstrings and comments point to pages (`docs/design/durability.md`) instead of repeating them."""
    missing = []
    for package in ("exam_contract", "edge_agent", "collector", "retention"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for ref in re.findall(r"\bdocs/[\w./-]+\.md\b", path.read_text(encoding="utf-8")):
                if not (ROOT / ref).is_file():
                    missing.append(f"{path.relative_to(ROOT)}: {ref}")
    assert missing == []


# ---------------------------------------------------------------------------- links stay inside the repository

MARKDOWN = sorted([ROOT / "README.md", *DOCS.rglob("*.md")])
LINK_RE = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
AUTOLINK_RE = re.compile(r"<([A-Za-z][A-Za-z0-9+.-]*:[^>\s]*)>")
BARE_URL_RE = re.compile(r"\b(?:https?|ftp)://\S+")
SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def _prose(text: str) -> str:
    """Markdown text without fenced code blocks and code spans (links there are not links)."""
    return re.sub(r"`[^`\n]*`", "", _strip_fences(text))


def slugs(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for line in _strip_fences(path.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group(1)).replace("`", "").strip().lower()
        slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def link_problems(path: Path, text: str | None = None) -> list[str]:
    """What is wrong with the links of the Markdown file `path` (whose text is `text`, when given)."""
    prose = _prose(path.read_text(encoding="utf-8") if text is None else text)
    problems = [f"links outside the repository: {url}" for url in AUTOLINK_RE.findall(prose)]
    problems += [f"links outside the repository: {url}" for url in BARE_URL_RE.findall(LINK_RE.sub("", prose))]
    for target in LINK_RE.findall(prose):
        if SCHEME_RE.match(target) or target.startswith("//"):
            problems.append(f"links outside the repository: {target}")
            continue
        file_part, _, anchor = target.partition("#")
        if file_part.startswith("/"):
            problems.append(f"links outside the repository: {target}")
            continue
        resolved = (path.parent / file_part).resolve() if file_part else path
        try:
            resolved.relative_to(ROOT)
        except ValueError:
            problems.append(f"links outside the repository: {target}")
            continue
        if not resolved.exists():
            problems.append(f"links to a missing file: {target}")
        elif anchor and resolved.suffix == ".md" and anchor not in slugs(resolved):
            problems.append(f"links to a missing heading: {target}")
    return problems


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_point_inside_the_repository_at_what_exists(path: Path):
    assert link_problems(path) == []


def test_the_link_check_catches_what_it_should():
    """The check itself: a link leaving the repository, a URL, a missing file or heading are each caught; a
    link in a code span is not a link."""
    text = ("[a](../../../outside/contract.md) [b](https://example.org) [c](missing.md) "
            "[d](states.md#no-such-heading) [e](states.md#gap-causes) `[f](ignored.md)` [g](../../../elsewhere.md)\n")
    problems = link_problems(DOCS / "design" / "README.md", text)
    assert any("outside the repository: ../../../outside/contract.md" in p for p in problems), problems
    assert any("outside the repository: https://example.org" in p for p in problems), problems
    assert any("outside the repository: ../../../elsewhere.md" in p for p in problems), problems
    assert any("missing file: missing.md" in p for p in problems), problems
    assert any("missing heading: states.md#no-such-heading" in p for p in problems), problems
    assert not any("#gap-causes" in p or "ignored.md" in p for p in problems), problems
    assert len(problems) == 5, problems
