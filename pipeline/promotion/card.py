"""The model card's account of a decision on production evidence.

The controller writes each decision on a challenger into its card in the registry
(pipeline/tracking/cards.py): one section, replaced by every later decision, that
says what was decided, against which champion, and on what evidence.
"""

from __future__ import annotations

import datetime as dt

from pipeline.tracking.cards import HEADING


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
