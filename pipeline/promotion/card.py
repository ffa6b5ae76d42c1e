"""The model card's account of a decision on production evidence.

A registered version's description in MLflow's registry is its model card
(MODEL_CARD.md, set when deploy registers it; pipeline/tracking/registry.py). The
bundle's own copy cannot change after deploy (it is signed and content-versioned), so
the controller writes each decision on a challenger into the registry's card: one
section, replaced by every later decision, that says what was decided, against which
champion, and on what evidence.
"""

from __future__ import annotations

import datetime as dt

HEADING = "## Promotion on production evidence"
# MLflow keeps a version's description in a VARCHAR(5000) (enforced on PostgreSQL)
DESCRIPTION_LIMIT = 5000


def counts_line(evidence: dict) -> str:
    if evidence["mode"] == "shadow":
        return (f"Shadow mode: {evidence['n']:,} labelled requests both models answered; "
                f"only the challenger right on {evidence['b']:,}, only the champion on "
                f"{evidence['c']:,}.")
    return (f"Canary mode: the champion right on {evidence['champion_right']:,} of "
            f"{evidence['champion_n']:,} labelled answers, the challenger on "
            f"{evidence['challenger_right']:,} of {evidence['challenger_n']:,}.")


def decision_section(champion: str, challenger: str, evidence: dict,
                     decided_at: dt.datetime, acted: bool) -> str:
    """The card's section for one decision (`evidence`: `Decision.as_dict()`;
    `acted`: whether the controller moved the aliases on it)."""
    level = round(100 * (1 - evidence["alpha"]))
    header = ("| labels | effect: accuracy, challenger - champion | "
              f"{level}% confidence sequence | e-value | p-value |")
    row = (f"| {evidence['labels']:,} | {evidence['effect']:+.4f} | "
           f"[{evidence['lower']:+.4f}, {evidence['upper']:+.4f}] | "
           f"{evidence['e_value']:.3g} | {evidence['p_value']:.3g} |")
    return f"""{HEADING}
Latest decision, {decided_at:%Y-%m-%d %H:%M} UTC (`textops decide`): **{evidence['outcome']}**,
this version (v{challenger}, the challenger) against v{champion} (the champion).
{evidence['reason']}.{' Acted on: the aliases moved.' if acted else ''}

{header}
|---|---|---|---|---|
{row}

{counts_line(evidence)} The rule: always-valid at alpha {evidence['alpha']}, promoting
only for an effect of at least {evidence['min_effect']} (conf/promotion/).
"""


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
