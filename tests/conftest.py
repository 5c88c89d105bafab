"""Put the repository root on sys.path so tests import the modules the way a user's
copy-paste project does (``import encoding``), without installing a package."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
