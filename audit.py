#!/usr/bin/env python
"""Find mislabelled photos, duplicates, train/test leakage and outliers of a run from its cached features."""
from featstack.commands.audit import main

if __name__ == "__main__":
    main(prog="audit.py")
