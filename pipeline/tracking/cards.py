"""A registered version's model card: its description in MLflow's registry.

Deploy sets it to the bundle's MODEL_CARD.md (registry.py); the bundle's own copy
cannot change after deploy (it is signed and content-versioned), so what is learnt
later goes into the registry's card: the promotion controller's decisions, one
section replaced by each (pipeline/promotion/card.py writes it).
"""

from __future__ import annotations

HEADING = "## Promotion on production evidence"
# MLflow keeps a version's description in a VARCHAR(5000) (enforced on PostgreSQL)
DESCRIPTION_LIMIT = 5000


def with_decision(card: str, section: str) -> str:
    """`card` with its decision section replaced by `section` (added at the end when it
    has none); the rest of the card as it was."""
    start = card.find(HEADING)
    if start < 0:
        return f"{card.rstrip()}\n\n{section}" if card.strip() else section
    end = card.find("\n## ", start + len(HEADING))
    rest = card[end + 1:] if end >= 0 else ""
    return f"{card[:start]}{section}" + (f"\n{rest}" if rest else "")


def fitted(card: str, limit: int = DESCRIPTION_LIMIT) -> str:
    """`card` within the registry's limit on a description: a decision section kept
    whole, the card's other text cut short, with a pointer to the whole card."""
    if len(card) <= limit:
        return card
    note = "\n\n(Cut short: the whole card is MODEL_CARD.md in the bundle.)\n\n"
    start = card.find(HEADING)
    section = card[start:] if start >= 0 else ""
    room = max(0, limit - len(section) - len(note))
    return (card[:room] + note + section)[:limit]


def write_card(client, name: str, version: str, section: str) -> None:
    """The version's registry card with `section` in place of its last decision. A
    registry that refuses it costs the card only: the decision is recorded already."""
    try:
        card = client.get_model_version(name, version).description or ""
        client.update_model_version(name, version,
                                    description=fitted(with_decision(card, section)))
    except Exception as err:  # noqa: BLE001 - e.g. a database's column limit
        print(f"decide: the model card of {name} v{version} was not updated: {err}")
