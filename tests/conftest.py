"""Test-wide settings: nothing may be downloaded (the hub is offline), quiet tokenizers."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
