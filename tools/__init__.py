"""Scripts beside the training code; synthetic.py is also imported by the tests and benchmarks."""
