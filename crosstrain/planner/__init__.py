"""Accelerator planner: what a pre-training run costs on any chip."""
