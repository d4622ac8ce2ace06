"""Test doubles: a fake relay served over real HTTP."""
