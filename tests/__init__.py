"""Test suite: parity with the reference libraries, CLI mechanics, bad input."""
