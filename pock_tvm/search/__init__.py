"""Choosing the sparse update (PockEngine / TTE contribution analysis): measure what each update buys
on the user's data (:mod:`.contribution`) and what the compiler plans it to cost, then pick the
updates that fit the device's budget (:mod:`.search`). :mod:`.space` says what can be chosen."""

from .contribution import Analysis, AnalysisSettings, OptionRow, analyze
from .search import Choice, search
from .space import RATIOS, Option, options_for, scheme_of

__all__ = ["RATIOS", "Analysis", "AnalysisSettings", "Choice", "Option", "OptionRow", "analyze",
           "options_for", "scheme_of", "search"]
