import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # for kernel_helpers


def pytest_configure(config):
    config.addinivalue_line("markers", "compile: runs torch.compile with inductor (slow, ~30 s each)")
