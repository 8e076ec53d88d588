"""Observe -> identify -> bake -> fold: find weight-standardized layers by what they compute and make them plain."""
