"""The chart's README is generated from values.yaml's `# --` comments by
scripts/chart_readme.py: the committed file is current, it has a row for every value the
schema knows, and the comment convention is read as documented."""

from __future__ import annotations

import json
import sys

from tests.chart.helm import CHART, ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import chart_readme


def test_the_committed_chart_readme_is_current() -> None:
    """helm/balancer/README.md is what scripts/chart_readme.py renders from values.yaml; after
    changing a value or its comment, run that script."""
    assert (CHART / "README.md").read_text() == chart_readme.render(), (
        "helm/balancer/README.md is out of date: run `.venv/bin/python scripts/chart_readme.py`")
    assert chart_readme.main(["--check"]) == 0


def _schema_leaves(schema: dict, prefix: str = "") -> set[str]:
    out = set()
    for name, sub in schema["properties"].items():
        if name == "global":
            continue
        if "properties" in sub and name != "config":
            out |= _schema_leaves(sub, f"{prefix}{name}.")
        else:
            out.add(f"{prefix}{name}")
    return out


def test_the_readme_has_a_row_for_every_value() -> None:
    """Each value of values.schema.json (config as one row) is a row, with its default."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    text = (CHART / "README.md").read_text()
    rows = {line.split("|")[1].strip().strip("`") for line in text.splitlines()
            if line.startswith("| `")}
    assert rows == _schema_leaves(schema)
    assert '| `image.digest` | string | `""` |' in text
    assert "| `terminationGracePeriodSeconds` | int | `null` |" in text  # the (int) hint


SAMPLE = """\
# A file header, not a description.

# -- A top-level value
# over two lines.
top: 1
group:
  # Not documented: no `# --`.
  plain: x
  # A note first.
  # -- (int) Typed by hand | with a pipe.
  count: null
# -- A documented mapping: one row, its keys none.
whole:
  # -- Inside a documented key.
  inner: true
list:
  - name: a
"""


def test_the_comment_convention() -> None:
    """`# --` opens a description that the next `#` lines continue; lines above it in the
    block are not part of it; keys without one, and keys inside a documented key, are not
    rows; `(type)` overrides the type; pipes are escaped."""
    assert chart_readme.documented_keys(SAMPLE) == [
        ("top", "A top-level value over two lines."),
        ("group.count", "(int) Typed by hand | with a pipe."),
        ("whole", "A documented mapping: one row, its keys none."),
    ]
    assert chart_readme.cell("a | b") == "a \\| b"
    assert [chart_readme.type_of(v) for v in (True, 1, 1.5, "s", [], {}, None)] == [
        "bool", "int", "float", "string", "list", "object", "null"]
