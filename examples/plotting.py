"""matplotlib for the examples' plots, when it is installed: the examples train and report
their results without it, and say that the plot was skipped."""


def pyplot():
    """matplotlib.pyplot with a file backend, or None (after saying so) when matplotlib is
    not installed."""
    try:
        import matplotlib
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt
