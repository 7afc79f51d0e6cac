"""Shared settings for the AdaLoRA tests."""

import sys
from pathlib import Path

import torch

# The test models are tiny: one thread is the fastest, and steady on a busy machine.
torch.set_num_threads(1)
# the tests share adalora_helpers.py (pytest's importlib mode does not put this folder on sys.path)
sys.path.insert(0, str(Path(__file__).parent))
