"""Every packaged config resolves to exactly the settings it had before recipes were split out of the configs.

``golden_resolved_configs.json`` holds ``load_config(name).to_dict()`` of every packaged config as written
before the recipes existed (one entry per config). A packaged config now names its recipe (``recipe``) and
resolves through it; the test compares everything but that name, so no published reproduction moves. The
recipe names themselves are checked in ``test_recipes.py``. Regenerate the file only for a deliberate change
of a packaged recipe, and say which reproduction moves in the commit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from okd.configs import packaged_configs
from okd.methods.build import load_config

GOLDEN = json.loads((Path(__file__).resolve().parent / "golden_resolved_configs.json").read_text(encoding="utf-8"))


def test_the_golden_list_covers_every_packaged_config():
    assert sorted(GOLDEN) == packaged_configs()


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_a_packaged_config_resolves_to_its_golden_settings(name):
    resolved = load_config(name).to_dict()
    resolved.pop("recipe", None)
    assert resolved == GOLDEN[name]
