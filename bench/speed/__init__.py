"""The speed benchmarks behind ``bench/train_speed.py``, one module per mode, with their shared runner and
table cells."""
