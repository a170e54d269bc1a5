"""Name mappings between our models and other implementations' state dicts.

Rules, not lookups of the other library: importing weights must not need it installed.
"""

from __future__ import annotations

import re

# timm's legacy_xception (Cadene's port): numbered blocks shifted by one, a flat
# ``rep`` Sequential of [ReLU], SeparableConv, BN triples, and stem/exit layers at the top.
_TIMM_XCEPTION_RULES: tuple[tuple[str, str], ...] = (
    (r"^entry_flow\.block1\.conv(\d)\.conv\.", r"conv\1."),
    (r"^entry_flow\.block1\.conv(\d)\.bn\.", r"bn\1."),
    (r"^exit_flow\.block\d+\.sepconv(\d)\.conv\.spatial\.", "conv{+2}.conv1."),
    (r"^exit_flow\.block\d+\.sepconv(\d)\.conv\.pointwise\.", "conv{+2}.pointwise."),
    (r"^exit_flow\.block\d+\.sepconv(\d)\.bn\.", "bn{+2}."),
    (r"^head\.classifier\.", "fc."),
)


def _timm_block_key(key: str, relu_first_blocks: set[int]) -> str | None:
    match = re.match(r"^\w+_flow\.block(\d+)\.(.*)$", key)
    if not match:
        return None
    block, rest = int(match[1]), match[2]
    prefix = f"block{block - 1}."
    rest = rest.replace("shortcut.conv.", "skip.").replace("shortcut.bn.", "skipbn.")
    conv = re.match(r"^convs\.sepconv(\d)\.(conv\.spatial|conv\.pointwise|bn)\.(.*)$", rest)
    if conv:
        index = 3 * (int(conv[1]) - 1) + (block in relu_first_blocks)
        part = {
            "conv.spatial": f"{index}.conv1",
            "conv.pointwise": f"{index}.pointwise",
            "bn": f"{index + 1}",
        }[conv[2]]
        rest = f"rep.{part}.{conv[3]}"
    return prefix + rest


def timm_xception_key(key: str) -> str:
    """Our Xception state-dict key -> timm ``legacy_xception``'s (paper topology)."""
    for pattern, replacement in _TIMM_XCEPTION_RULES:
        match = re.match(pattern, key)
        if match:
            if "{+2}" in replacement:
                replacement = replacement.replace("{+2}", str(int(match[1]) + 2))
                return replacement + key[match.end() :]
            return re.sub(pattern, replacement, key)
    # Only the first entry-flow module (block2) starts without a ReLU.
    mapped = _timm_block_key(key, relu_first_blocks=set(range(3, 100)))
    if mapped is None:
        raise KeyError(f"no timm legacy_xception name for {key!r}")
    return mapped
