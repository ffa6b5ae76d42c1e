"""Promotion on evidence from production: the challenger against the champion on the
same labelled traffic, with a sequential test that stays valid however often it is
checked (`sequential`)."""

from pipeline.promotion.sequential import Decision, Paired, Rule, SequentialTest, Unpaired, decide

__all__ = ["Decision", "Paired", "Rule", "SequentialTest", "Unpaired", "decide"]
