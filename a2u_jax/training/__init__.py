"""Training: state and optimiser (state.py), pure steps (steps.py), the loop (loop.py), the
configs' contract (config_checks.py), checkpoints and metrics (bookkeeping.py), validation
during training (validation.py), one run per workdir (workdir.py)."""
