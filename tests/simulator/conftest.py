import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for p in (HERE, HERE.parents[1]):  # naive.py; the repository root (dipstream package)
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
