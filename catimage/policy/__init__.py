"""Deciding what to draw: the routing rule, lambda calibration and the exact deferral curve
(`routing`), and the online budget controller (`budget`)."""
