"""docs/tour.md and README's map of the code name what the tree holds."""

import importlib
import re

from tests.helpers import REPO


def test_tour_names_existing_functions():
    text = (REPO / "docs" / "tour.md").read_text()
    named = re.findall(r"`([\w/]+)\.py: ([\w.]+)", text)
    assert len(named) >= 10
    for path, name in named:
        obj = importlib.import_module(path.replace("/", "."))
        for part in name.split("."):
            assert hasattr(obj, part), f"docs/tour.md names {path}.py: {name}, which does not exist"
            obj = getattr(obj, part)


def test_readme_map_paths_exist():
    text = (REPO / "README.md").read_text()
    table = text[text.index("## Map of the code") :].split("\n\n")[1]
    for cell in re.findall(r"^\| `([^`]+)`", table, flags=re.M):
        assert (REPO / cell).exists(), f"README's map names {cell}, which does not exist"
