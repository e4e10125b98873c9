"""Checkpoint formats: readers and writers around the planner."""
