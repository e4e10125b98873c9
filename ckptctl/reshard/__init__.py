"""Resharding: the pure planner (`plan`), the worker (`run`), and the torchrun launcher (`launch`)."""
