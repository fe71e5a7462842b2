"""
`python -m qrpo_trl.demo` (`make demo`): aligns SmolLM2-135M-Instruct offline on a built-in task with QRPO; see the
README.
"""
