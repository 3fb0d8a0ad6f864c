"""What a person reads: figures, summary.json and report.md of a run, and layers compared side by side.

    plots.py      every figure of a run (and of `compare` and `trace`), PNG and PDF, drawn from files alone
    findings.py   summary.json (every figure the findings rest on) and report.md (findings picked by the numbers)
    compare.py    a training run's dictionaries at a few layers, side by side (`layerflow compare`)
"""

from layerflow.report.compare import LayerComparison, compare_layers
from layerflow.report.findings import build_summary, find_plots, findings_markdown, fmt, report_run, write_report
from layerflow.report.plots import layer_comparison, make_plots, trace_flow, transfer_heatmap

__all__ = ["LayerComparison", "build_summary", "compare_layers", "find_plots", "findings_markdown", "fmt", "layer_comparison", "make_plots",
           "report_run", "trace_flow", "transfer_heatmap", "write_report"]
