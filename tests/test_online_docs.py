"""docs/online.md's config table is generated from OnlineConfig, and every key it names exists."""

import re
from pathlib import Path

from nashalign.config import config_keys, config_reference
from nashalign.online.loop import OnlineConfig

ROOT = Path(__file__).resolve().parents[1]


def test_online_docs_match_the_config_tree():
    text = (ROOT / "docs" / "online.md").read_text()
    match = re.search(r"<!-- config-reference:start -->\n(.*?)<!-- config-reference:end -->", text, re.S)
    assert match, "docs/online.md has no generated config reference block"
    assert match.group(1) == config_reference(OnlineConfig), (
        "regenerate with: python -c 'from nashalign.config import config_reference; "
        "from nashalign.online.loop import OnlineConfig; print(config_reference(OnlineConfig))'"
    )
    keys = set(config_keys(OnlineConfig))
    sections = {key.split(".")[0] for key in keys}
    mentioned = {k for k in re.findall(r"`([a-z_]+(?:\.[a-z_]+)+)(?:[:=][^`]*)?`", text)
                 if k.split(".")[0] in sections and not k.endswith((".jsonl", ".json", ".safetensors"))}
    assert {"run.algorithm", "pairs.method", "loss.eta"} <= mentioned
    assert mentioned <= keys, f"documented keys missing from the config tree: {sorted(mentioned - keys)}"
