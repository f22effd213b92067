"""Side-by-side latency measurements of backends on the same inputs (``cpm bench``)."""
