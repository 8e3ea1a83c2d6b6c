#!/usr/bin/env python
"""Extract and cache pooled features of frozen ImageNet backbones for every image of a dataset."""
from featstack.commands.extract import main

if __name__ == "__main__":
    main(prog="extract_features.py")
