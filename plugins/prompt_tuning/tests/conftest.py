"""Shared settings for the prompt tuning tests."""

import torch

# The test models are tiny: one thread is the fastest, and steady on a busy machine.
torch.set_num_threads(1)
