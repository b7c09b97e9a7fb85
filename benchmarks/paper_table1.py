"""Issue 7's name for benchmarks/planner_table1.py (same rows, same flags)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from planner_table1 import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
