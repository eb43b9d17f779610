"""Entry point of `python -m mpidd.report`: readable tables and figures from finished runs, no
MPI. The command line is mpidd.cli.report (its names are re-exported here for code that
imported them from mpidd.report).

    python -m mpidd.report runs/NAME                           # print the run's table again
    python -m mpidd.report runs/A runs/B --out reports/AB      # report.md + PNG figures
"""

import sys

from .cli.report import (COMPARISON, comparison_table, confusion_table, format_any, format_table, format_width_table,
                         load_results, main, models_table, write_report, write_run_report)

__all__ = ["COMPARISON", "comparison_table", "confusion_table", "format_any", "format_table", "format_width_table",
           "load_results", "main", "models_table", "write_report", "write_run_report"]



def entry_point():
    """`mpidd-report`, as `python -m mpidd.report`."""
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
