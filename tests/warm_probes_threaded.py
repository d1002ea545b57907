"""Imported by a warm worker in tests/test_warm_worker.py: leaves a Python thread running, as some libraries'
imports do; the worker must then decline to fork."""

import threading
import time

threading.Thread(target=time.sleep, args=(3600,), name="left-running", daemon=True).start()
