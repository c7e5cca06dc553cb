import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# A shell that starts the suite in the background ignores SIGINT, and an ignored signal stays ignored
# in every child: the tests that interrupt a command with SIGINT need its usual disposition back.
signal.signal(signal.SIGINT, signal.default_int_handler)
