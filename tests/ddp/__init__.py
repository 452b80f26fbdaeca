"""Tests of ``conef_fl.ddp``, one module each, over one shared multi-process harness (``harness.py``)."""
