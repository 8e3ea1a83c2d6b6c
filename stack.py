#!/usr/bin/env python
"""Train logistic / LightGBM / stacked models on cached features and write an honest holdout report."""
from featstack.commands.stack import main

if __name__ == "__main__":
    main(prog="stack.py")
