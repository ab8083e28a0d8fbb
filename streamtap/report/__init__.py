"""The HTML report of a store (``write_report``, ``streamtap report``) and the figures it is made of.

``streamtap.report.figures`` draws each analysis's result with matplotlib; ``write_report`` puts
them on one self-contained page, with the numbers behind them as CSV files beside it.
"""

from .page import write_report

__all__ = ["write_report"]
