#!/usr/bin/env python
"""The photo app: a web page and a JSON API that say which class (breed) is in a photo, through a stack.py run."""
from featstack.commands.serve import main

if __name__ == "__main__":
    main(prog="serve.py")
