#!/usr/bin/env python
"""Which class (breed) is in this photo? Answers one or many photos through a trained stack.py run."""
from featstack.commands.predict import main

if __name__ == "__main__":
    main(prog="predict.py")
