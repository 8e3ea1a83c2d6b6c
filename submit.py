#!/usr/bin/env python
"""Write a run's Kaggle submission, validated, and optionally submit it with the official kaggle tool."""
from featstack.commands.submit import main

if __name__ == "__main__":
    main(prog="submit.py")
