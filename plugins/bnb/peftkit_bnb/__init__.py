"""peftkit-bnb: bitsandbytes 4-bit (nf4, fp4) and 8-bit base layers for every peftkit weight method."""

__version__ = "0.1.2"
