"""Training: state and optimiser (state.py), pure steps (steps.py), the loop (loop.py)."""
